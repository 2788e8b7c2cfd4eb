// CUDA kernel of moetrain::expert_sort: the chunked counting sort of expert_sort.h, one block
// per chunk of kChunk ids.
//
// (1) histogram_kernel: a shared-memory histogram per chunk (integer atomics: exact, so still
// deterministic), written to hist[chunk][bin]. (2) ATen cumsums turn it into each chunk's first
// slot per bin. (3) scatter_kernel: one warp per chunk walks its ids in order, 32 at a time;
// __match_any_sync groups the lanes holding the same id, a lane's rank in its group is the number
// of lower lanes in it, and the group's lowest lane advances the bin's slot, so equal ids keep
// their order (stable). Bins live in shared memory; above kMaxSharedBins the launcher uses ATen's
// stable sort and bincount instead.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "expert_sort.h"

namespace moetrain {
namespace {

constexpr int64_t kChunk = 4096;
constexpr int kHistThreads = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kMaxSharedBins = 4096;  // 32 KiB of int64 slots per block

template <typename index_t>
__global__ void histogram_kernel(const index_t* __restrict__ ids, int64_t num_ids, int64_t num_bins,
                                 int64_t* __restrict__ hist) {
  extern __shared__ int shared_counts[];
  for (int64_t b = threadIdx.x; b < num_bins; b += blockDim.x) {
    shared_counts[b] = 0;
  }
  __syncthreads();
  const int64_t begin = int64_t{blockIdx.x} * kChunk;
  const int64_t end = begin + kChunk < num_ids ? begin + kChunk : num_ids;
  for (int64_t a = begin + threadIdx.x; a < end; a += blockDim.x) {
    const int64_t id = ids[a];
    CUDA_KERNEL_ASSERT(id >= 0 && id < num_bins && "moetrain::expert_sort: id out of range");
    atomicAdd(&shared_counts[id], 1);
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < num_bins; b += blockDim.x) {
    hist[int64_t{blockIdx.x} * num_bins + b] = shared_counts[b];
  }
}

template <typename index_t>
__global__ void scatter_kernel(const index_t* __restrict__ ids, int64_t num_ids, int64_t num_bins,
                               const int64_t* __restrict__ first_slot,
                               int64_t* __restrict__ indices) {
  extern __shared__ int64_t slot[];
  const int lane = threadIdx.x;
  for (int64_t b = lane; b < num_bins; b += kWarpSize) {
    slot[b] = first_slot[int64_t{blockIdx.x} * num_bins + b];
  }
  __syncwarp();
  const int64_t begin = int64_t{blockIdx.x} * kChunk;
  const int64_t end = begin + kChunk < num_ids ? begin + kChunk : num_ids;
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t a = base + lane;
    const bool valid = a < end;
    const int64_t id = valid ? static_cast<int64_t>(ids[a]) : -1;  // -1: a group of its own
    const unsigned group = __match_any_sync(0xffffffffu, id);
    int64_t position = 0;
    if (valid) {
      position = slot[id] + __popc(group & lower_lanes);
    }
    __syncwarp();  // every lane has read its bin's slot before the group leaders advance them
    if (valid) {
      indices[position] = a;
      if ((group & lower_lanes) == 0) {
        slot[id] += __popc(group);
      }
    }
    __syncwarp();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> expert_sort_cuda(const at::Tensor& expert_ids,
                                                    int64_t num_bins) {
  check_expert_sort_args(expert_ids, num_bins);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const at::Tensor ids = expert_ids.contiguous();
  const int64_t num_ids = ids.size(0);
  const auto long_options = ids.options().dtype(at::kLong);
  if (num_ids == 0 || num_bins == 0) {
    return {at::empty({num_ids}, long_options), at::zeros({num_bins}, long_options)};
  }
  if (num_bins > kMaxSharedBins) {
    auto sorted = at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    return {std::get<1>(sorted), at::bincount(ids, {}, num_bins)};
  }
  const int64_t num_chunks = (num_ids + kChunk - 1) / kChunk;
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor hist = at::empty({num_chunks, num_bins}, long_options);
  at::Tensor indices = at::empty({num_ids}, long_options);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moetrain_expert_sort_cuda", [&] {
    histogram_kernel<index_t><<<num_chunks, kHistThreads, num_bins * sizeof(int), stream>>>(
        ids.const_data_ptr<index_t>(), num_ids, num_bins, hist.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor counts = hist.sum(0);
  const at::Tensor bin_start = at::cumsum(counts, 0).sub_(counts);
  const at::Tensor first_slot = at::cumsum(hist, 0).sub_(hist).add_(bin_start);
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moetrain_expert_sort_cuda", [&] {
    scatter_kernel<index_t><<<num_chunks, kWarpSize, num_bins * sizeof(int64_t), stream>>>(
        ids.const_data_ptr<index_t>(), num_ids, num_bins, first_slot.const_data_ptr<int64_t>(),
        indices.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {indices, counts};
}

}  // namespace moetrain
