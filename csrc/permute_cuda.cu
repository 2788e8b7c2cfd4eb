// CUDA kernels for moetrain::permute, unpermute and unpermute_backward, the same algorithms as
// permute_cpu.cpp: one warp per row (permute) or per token (unpermute), grid-stride over them.
//
// permute copies each row as the widest vector (16, 8, 4, 2 or 1 bytes) that divides the row and
// the pointers' alignment; padding rows are zeros. Bit-identical to the reference for any dtype.
//
// unpermute is atomic-free: a stable sort of row_token (ATen's, on the device) and a
// searchsorted give each token its rows in ascending row order (a CSR index; padding rows sort
// first and are never read). Each warp then sums its token's rows in that order, in opmath, with
// the multiply and the add rounded separately (__fmul_rn/__fadd_rn: no FMA contraction). So the
// result is deterministic and bit-identical to the CPU reference's, which adds in row order too
// (torch's CUDA index_add_ uses atomics, in no fixed order).
//
// unpermute_backward: one warp per row writes grad_rows[r] = w_r * g[t] and sums the dot product
// <g[t], rows[r]> for grad_weight[r] in lane partial sums and a warp shuffle tree: within fp32
// dot-product rounding of the reference's einsum, like the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "permute.h"

namespace moetrain {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

int num_blocks(int64_t num_items) {
  const int64_t wanted = (num_items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * 16;
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

__device__ __forceinline__ int64_t first_warp() {
  return int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
}

__device__ __forceinline__ int64_t warp_stride() {
  return int64_t{gridDim.x} * kWarpsPerBlock;
}

template <typename vec_t, typename index_t>
__global__ void permute_kernel(const vec_t* __restrict__ x, const index_t* __restrict__ row_token,
                               vec_t* __restrict__ rows, int64_t num_rows, int64_t num_tokens,
                               int64_t vecs_per_row) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = first_warp(); r < num_rows; r += warp_stride()) {
    const int64_t t = row_token[r];
    CUDA_KERNEL_ASSERT(t < num_tokens && "moetrain::permute: row_token out of range");
    vec_t* dst = rows + r * vecs_per_row;
    if (t < 0) {
      for (int64_t i = lane; i < vecs_per_row; i += kWarpSize) {
        dst[i] = vec_t{};
      }
    } else {
      const vec_t* src = x + t * vecs_per_row;
      for (int64_t i = lane; i < vecs_per_row; i += kWarpSize) {
        dst[i] = src[i];
      }
    }
  }
}

template <typename vec_t, typename index_t>
void launch_permute(const at::Tensor& x, const index_t* tok, at::Tensor& rows, int64_t row_bytes) {
  const int64_t num_rows = rows.size(0);
  permute_kernel<vec_t, index_t>
      <<<num_blocks(num_rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          static_cast<const vec_t*>(x.const_data_ptr()), tok,
          static_cast<vec_t*>(rows.mutable_data_ptr()), num_rows, x.size(0),
          row_bytes / static_cast<int64_t>(sizeof(vec_t)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}
__device__ __forceinline__ float add_rn(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ double add_rn(double a, double b) {
  return __dadd_rn(a, b);
}

template <typename scalar_t, typename acc_t>
__global__ void unpermute_kernel(const scalar_t* __restrict__ rows,
                                 const acc_t* __restrict__ weight,
                                 const int64_t* __restrict__ offsets,
                                 const int64_t* __restrict__ rows_of_token,
                                 scalar_t* __restrict__ out, int64_t num_rows, int64_t num_tokens,
                                 int64_t dim) {
  // Rows sorted after offsets[T] reference a token >= T: the reference raises for them.
  CUDA_KERNEL_ASSERT(offsets[num_tokens] == num_rows &&
                     "moetrain::unpermute: row_token out of range for num_tokens");
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t t = first_warp(); t < num_tokens; t += warp_stride()) {
    const int64_t begin = offsets[t], end = offsets[t + 1];
    for (int64_t d = lane; d < dim; d += kWarpSize) {
      acc_t acc = 0;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t r = rows_of_token[j];
        acc_t v = static_cast<acc_t>(rows[r * dim + d]);
        if (weight != nullptr) {
          v = mul_rn(v, weight[r]);
        }
        acc = add_rn(acc, v);
      }
      out[t * dim + d] = static_cast<scalar_t>(acc);
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void unpermute_backward_kernel(const scalar_t* __restrict__ grad_out,
                                          const scalar_t* __restrict__ rows,
                                          const index_t* __restrict__ row_token,
                                          const acc_t* __restrict__ weight,
                                          scalar_t* __restrict__ grad_rows,
                                          acc_t* __restrict__ grad_weight, int64_t num_rows,
                                          int64_t num_tokens, int64_t dim) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = first_warp(); r < num_rows; r += warp_stride()) {
    const int64_t t = row_token[r];
    CUDA_KERNEL_ASSERT(t < num_tokens && "moetrain::unpermute_backward: row_token out of range");
    scalar_t* out = grad_rows + r * dim;
    acc_t dot = 0;
    if (t < 0) {
      for (int64_t d = lane; d < dim; d += kWarpSize) {
        out[d] = scalar_t(0);
      }
    } else {
      const scalar_t* g = grad_out + t * dim;
      const scalar_t* x = rows + r * dim;
      const acc_t w = weight[r];
      for (int64_t d = lane; d < dim; d += kWarpSize) {
        const acc_t g_d = static_cast<acc_t>(g[d]);
        out[d] = static_cast<scalar_t>(mul_rn(g_d, w));
        dot += g_d * static_cast<acc_t>(x[d]);
      }
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {  // warp tree sum
      dot += __shfl_down_sync(0xffffffffu, dot, offset);
    }
    if (lane == 0) {
      grad_weight[r] = dot;
    }
  }
}

}  // namespace

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& row_token) {
  check_permute_args(x, row_token);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor tokens = row_token.contiguous();
  at::Tensor rows = at::empty({tokens.size(0), x_c.size(1)}, x_c.options());
  const int64_t row_bytes = x_c.size(1) * static_cast<int64_t>(x_c.element_size());
  if (rows.numel() == 0) {
    return rows;
  }
  // the widest copy unit dividing the row length and both base addresses
  const auto addresses = reinterpret_cast<uintptr_t>(x_c.const_data_ptr()) |
                         reinterpret_cast<uintptr_t>(rows.const_data_ptr());
  const auto aligned = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && addresses % static_cast<uintptr_t>(bytes) == 0;
  };
  AT_DISPATCH_INDEX_TYPES(tokens.scalar_type(), "moetrain_permute_cuda", [&] {
    const index_t* tok = tokens.const_data_ptr<index_t>();
    if (aligned(16)) {
      launch_permute<uint4>(x_c, tok, rows, row_bytes);
    } else if (aligned(8)) {
      launch_permute<uint2>(x_c, tok, rows, row_bytes);
    } else if (aligned(4)) {
      launch_permute<uint32_t>(x_c, tok, rows, row_bytes);
    } else if (aligned(2)) {
      launch_permute<uint16_t>(x_c, tok, rows, row_bytes);
    } else {
      launch_permute<uint8_t>(x_c, tok, rows, row_bytes);
    }
  });
  return rows;
}

at::Tensor unpermute_cuda(const at::Tensor& rows, const at::Tensor& row_token,
                          const std::optional<at::Tensor>& row_weight, int64_t num_tokens) {
  check_unpermute_args(rows, row_token, row_weight, num_tokens);
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor tokens = row_token.to(at::kLong).contiguous();
  const at::ScalarType acc_type = at::toOpMathType(rows_c.scalar_type());
  at::Tensor weight;  // undefined = weight 1
  if (row_weight.has_value() && row_weight->defined()) {
    weight = row_weight->to(acc_type).contiguous();
  }
  at::Tensor out = at::empty({num_tokens, rows_c.size(1)}, rows_c.options());
  if (out.numel() == 0) {
    return out;
  }
  // CSR index token -> rows: the stable sort keeps each token's rows in ascending row order
  auto [sorted_tokens, order] = at::sort(tokens, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets =
      at::searchsorted(sorted_tokens, at::arange(num_tokens + 1, tokens.options()));
  const int64_t num_rows = rows_c.size(0), dim = rows_c.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows_c.scalar_type(), "moetrain_unpermute_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        unpermute_kernel<scalar_t, acc_t>
            <<<num_blocks(num_tokens), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                rows_c.const_data_ptr<scalar_t>(),
                weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr,
                offsets.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                out.mutable_data_ptr<scalar_t>(), num_rows, num_tokens, dim);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out,
                                                           const at::Tensor& rows,
                                                           const at::Tensor& row_token,
                                                           const at::Tensor& row_weight) {
  check_unpermute_backward_args(grad_out, rows, row_token, row_weight);
  const c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor tokens = row_token.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(rows_c.scalar_type());
  const at::Tensor weight = row_weight.to(acc_type).contiguous();
  at::Tensor grad_rows = at::empty_like(rows_c);
  at::Tensor grad_weight = at::empty({rows_c.size(0)}, weight.options());
  const int64_t num_rows = rows_c.size(0), num_tokens = g.size(0), dim = rows_c.size(1);
  if (num_rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, rows_c.scalar_type(), "moetrain_unpermute_backward_cuda", [&] {
          using scalar_t_ = scalar_t;
          using acc_t = at::opmath_type<scalar_t>;
          AT_DISPATCH_INDEX_TYPES(tokens.scalar_type(), "moetrain_unpermute_backward_cuda", [&] {
            unpermute_backward_kernel<scalar_t_, acc_t, index_t>
                <<<num_blocks(num_rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                    g.const_data_ptr<scalar_t_>(), rows_c.const_data_ptr<scalar_t_>(),
                    tokens.const_data_ptr<index_t>(), weight.const_data_ptr<acc_t>(),
                    grad_rows.mutable_data_ptr<scalar_t_>(), grad_weight.mutable_data_ptr<acc_t>(),
                    num_rows, num_tokens, dim);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
  }
  return {grad_rows, grad_weight.to(row_weight.scalar_type())};
}

}  // namespace moetrain
