// Kernels behind the moetrain::permute and moetrain::unpermute ops.
//
// The schemas, autograd and fake (meta) kernels live in Python (moetrain/ops/permute.py); this
// extension only adds device kernels for them (registration.cpp). Every kernel has the pure-torch
// reference beside its schema as its contract, and tests/unit/test_ops_csrc.py checks that they
// agree, forward and backward.
//
// Legend: T tokens, D model dim, R rows. row_token[r] is the token row r was taken from, or a
// negative value (-1) for a padding row.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace moetrain {

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& row_token);
at::Tensor unpermute_cpu(const at::Tensor& rows, const at::Tensor& row_token,
                         const std::optional<at::Tensor>& row_weight, int64_t num_tokens);
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out,
                                                          const at::Tensor& rows,
                                                          const at::Tensor& row_token,
                                                          const at::Tensor& row_weight);

#ifdef WITH_CUDA
at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& row_token);
at::Tensor unpermute_cuda(const at::Tensor& rows, const at::Tensor& row_token,
                          const std::optional<at::Tensor>& row_weight, int64_t num_tokens);
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out,
                                                           const at::Tensor& rows,
                                                           const at::Tensor& row_token,
                                                           const at::Tensor& row_weight);
#endif

// Argument checks shared by the CPU and CUDA kernels: a user can reach these through the public
// ops, so they name the argument and what was expected.
inline void check_row_token(const at::Tensor& row_token, const at::Tensor& data, const char* op) {
  TORCH_CHECK(row_token.dim() == 1, op, ": row_token must be 1-D, got ", row_token.dim(), "-D");
  TORCH_CHECK(row_token.scalar_type() == at::kLong || row_token.scalar_type() == at::kInt, op,
              ": row_token must be int64 or int32, got ", row_token.scalar_type());
  TORCH_CHECK(row_token.device() == data.device(), op, ": row_token is on ", row_token.device(),
              " but the data is on ", data.device());
}

inline void check_permute_args(const at::Tensor& x, const at::Tensor& row_token) {
  TORCH_CHECK(x.dim() == 2, "moetrain::permute: x must be [T, D], got ", x.sizes());
  check_row_token(row_token, x, "moetrain::permute");
}

inline void check_unpermute_args(const at::Tensor& rows, const at::Tensor& row_token,
                                 const std::optional<at::Tensor>& row_weight, int64_t num_tokens) {
  const char* op = "moetrain::unpermute";
  TORCH_CHECK(rows.dim() == 2, op, ": rows must be [R, D], got ", rows.sizes());
  check_row_token(row_token, rows, op);
  TORCH_CHECK(row_token.size(0) == rows.size(0), op, ": row_token has ", row_token.size(0),
              " entries for ", rows.size(0), " rows");
  TORCH_CHECK(at::isFloatingType(rows.scalar_type()), op,
              ": rows must be a floating-point tensor, got ", rows.scalar_type());
  TORCH_CHECK(num_tokens >= 0, op, ": num_tokens must be >= 0, got ", num_tokens);
  if (row_weight.has_value() && row_weight->defined()) {
    const at::Tensor& w = *row_weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == rows.size(0), op, ": row_weight must be [R] = [",
                rows.size(0), "], got ", w.sizes());
    TORCH_CHECK(w.device() == rows.device(), op, ": row_weight is on ", w.device(),
                " but rows are on ", rows.device());
  }
}

inline void check_unpermute_backward_args(const at::Tensor& grad_out, const at::Tensor& rows,
                                          const at::Tensor& row_token,
                                          const at::Tensor& row_weight) {
  const char* op = "moetrain::unpermute_backward";
  check_unpermute_args(rows, row_token, row_weight, grad_out.dim() > 0 ? grad_out.size(0) : 0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(1) == rows.size(1), op,
              ": grad_out must be [T, D] with D = ", rows.size(1), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == rows.scalar_type(), op, ": grad_out is ",
              grad_out.scalar_type(), " but rows are ", rows.scalar_type());
  TORCH_CHECK(grad_out.device() == rows.device(), op, ": grad_out is on ", grad_out.device(),
              " but rows are on ", rows.device());
  TORCH_CHECK(row_weight.defined() && at::isFloatingType(row_weight.scalar_type()), op,
              ": row_weight must be a floating-point tensor");
}

// Rows handled by one parallel task: about 32K elements, so short rows are not one task each.
inline int64_t grain_rows(int64_t dim) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(dim, 1));
}

}  // namespace moetrain
