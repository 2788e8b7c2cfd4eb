// CPU kernel of moetrain::expert_sort: a counting sort, chunked over OpenMP threads
// (at::parallel_for) as described in expert_sort.h. O(A + chunks x bins).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "expert_sort.h"

namespace moetrain {
namespace {

constexpr int64_t kMinChunk = 1 << 14;  // ids per chunk at least: below that one thread is faster

template <typename index_t>
void counting_sort(const index_t* ids, int64_t num_ids, int64_t num_bins, int64_t* indices,
                   int64_t* counts) {
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_ids / kMinChunk));
  const int64_t chunk = (num_ids + num_chunks - 1) / num_chunks;
  // (1) histogram per chunk; slots[c * B + b] becomes chunk c's next slot for bin b
  std::vector<int64_t> slots(num_chunks * num_bins, 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      int64_t* hist = slots.data() + c * num_bins;
      for (int64_t a = c * chunk; a < std::min(num_ids, (c + 1) * chunk); ++a) {
        ++hist[ids[a]];
      }
    }
  });
  // (2) exclusive scan, bin-major then chunk-minor: bin b's slots start after all smaller bins
  int64_t next = 0;
  for (int64_t b = 0; b < num_bins; ++b) {
    const int64_t start = next;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t n = slots[c * num_bins + b];
      slots[c * num_bins + b] = next;
      next += n;
    }
    counts[b] = next - start;
  }
  // (3) each chunk places its ids in order
  at::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      int64_t* slot = slots.data() + c * num_bins;
      for (int64_t a = c * chunk; a < std::min(num_ids, (c + 1) * chunk); ++a) {
        indices[slot[ids[a]]++] = a;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> expert_sort_cpu(const at::Tensor& expert_ids, int64_t num_bins) {
  check_expert_sort_args(expert_ids, num_bins);
  const at::Tensor ids = expert_ids.contiguous();
  const int64_t num_ids = ids.size(0);
  at::Tensor indices = at::empty({num_ids}, ids.options().dtype(at::kLong));
  at::Tensor counts = at::empty({num_bins}, ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "moetrain_expert_sort_cpu", [&] {
    const index_t* id = ids.const_data_ptr<index_t>();
    for (int64_t a = 0; a < num_ids; ++a) {  // checked up front: the kernel indexes bins by id
      TORCH_CHECK(id[a] >= 0 && id[a] < num_bins, "moetrain::expert_sort: expert_ids[", a,
                  "] = ", id[a], " is outside [0, ", num_bins, ")");
    }
    counting_sort(id, num_ids, num_bins, indices.mutable_data_ptr<int64_t>(),
                  counts.mutable_data_ptr<int64_t>());
  });
  return {indices, counts};
}

}  // namespace moetrain
