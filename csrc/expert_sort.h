// Kernels behind moetrain::expert_sort: the stable argsort of expert ids and their histogram, as
// a counting sort (schema, reference and fake kernel in moetrain/ops/sort.py).
//
// Both devices run the same three steps over fixed chunks of the ids: (1) a histogram per chunk;
// (2) each chunk's first slot per bin = the bin's start (exclusive scan of the totals) + the
// counts of that bin in earlier chunks; (3) each chunk scatters its ids' positions in order from
// those slots. Chunks are independent, the result (a stable sort is unique) does not depend on
// how many there are: deterministic, and equal to the reference's torch.sort(stable=True).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

namespace moetrain {

std::tuple<at::Tensor, at::Tensor> expert_sort_cpu(const at::Tensor& expert_ids, int64_t num_bins);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> expert_sort_cuda(const at::Tensor& expert_ids, int64_t num_bins);
#endif

inline void check_expert_sort_args(const at::Tensor& expert_ids, int64_t num_bins) {
  const char* op = "moetrain::expert_sort";
  TORCH_CHECK(expert_ids.dim() == 1, op, ": expert_ids must be 1-D, got ", expert_ids.sizes());
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong || expert_ids.scalar_type() == at::kInt, op,
              ": expert_ids must be int64 or int32, got ", expert_ids.scalar_type());
  TORCH_CHECK(num_bins >= 0, op, ": num_bins must be >= 0, got ", num_bins);
}

}  // namespace moetrain
