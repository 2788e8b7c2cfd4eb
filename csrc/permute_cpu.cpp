// CPU kernels for moetrain::permute, unpermute and unpermute_backward (OpenMP through
// at::parallel_for, which honours torch.set_num_threads).
//
// permute: one task per block of rows; each row is one memcpy of x[row_token[r]] (bit-identical
// to the reference's index_select for every dtype) or zeros for a padding row.
//
// unpermute: a stable counting sort of the rows by token gives each token its rows in ascending
// row order (a CSR index, O(R + T), built serially: it is small beside the R x D pass). Tokens are
// then split over threads and each thread sums its tokens' rows in that order, in opmath (fp32
// for bf16/fp16, fp64 for fp64), with the weight multiply rounded before the add (the file is
// built with -ffp-contract=off). That is the reference's arithmetic and order (index_add_ walks
// the rows in order), so the result is bit-identical to it; no atomics, deterministic.
//
// unpermute_backward: one pass over the rows, each reading its token's gradient once for both
// gradients: grad_rows[r] = w_r * g[t] (bit-identical to the reference) and grad_weight[r] =
// <g[t], rows[r]>, a dot product summed in 16 lanes — not the reference einsum's (MKL's) order, so
// equal to it within fp32 dot-product rounding, not bitwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "permute.h"

namespace moetrain {
namespace {

template <typename index_t>
void check_tokens_in_range(const index_t* row_token, int64_t num_rows, int64_t num_tokens,
                           const char* op) {
  for (int64_t r = 0; r < num_rows; ++r) {
    TORCH_CHECK(row_token[r] < num_tokens, op, ": row_token[", r, "] = ", row_token[r],
                " is out of range for ", num_tokens, " tokens");
  }
}

// Token -> rows index: rows of token t are rows_of_token[offsets[t] : offsets[t + 1]], ascending.
struct TokenRows {
  std::vector<int64_t> offsets;
  std::vector<int64_t> rows_of_token;
};

template <typename index_t>
TokenRows token_rows(const index_t* row_token, int64_t num_rows, int64_t num_tokens) {
  TokenRows index;
  index.offsets.assign(num_tokens + 1, 0);
  for (int64_t r = 0; r < num_rows; ++r) {
    if (row_token[r] >= 0) {
      ++index.offsets[row_token[r] + 1];
    }
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    index.offsets[t + 1] += index.offsets[t];
  }
  index.rows_of_token.resize(index.offsets[num_tokens]);
  std::vector<int64_t> next(index.offsets.begin(), index.offsets.end() - 1);
  for (int64_t r = 0; r < num_rows; ++r) {
    if (row_token[r] >= 0) {
      index.rows_of_token[next[row_token[r]]++] = r;
    }
  }
  return index;
}

// acc[d] += src[d] (* w): the loops the compiler vectorizes over D.
template <typename scalar_t, typename acc_t>
inline void add_row(acc_t* __restrict acc, const scalar_t* __restrict src, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    acc[d] += static_cast<acc_t>(src[d]);
  }
}

template <typename scalar_t, typename acc_t>
inline void add_weighted_row(acc_t* __restrict acc, const scalar_t* __restrict src, acc_t w,
                             int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t product = static_cast<acc_t>(src[d]) * w;  // rounded, as the reference's multiply
    acc[d] += product;
  }
}

template <typename scalar_t, typename index_t>
void unpermute_kernel(const at::Tensor& rows, const index_t* row_token, const at::Tensor& weight,
                      at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kAccIsOut = std::is_same_v<acc_t, scalar_t>;
  const int64_t num_rows = rows.size(0), num_tokens = out.size(0), dim = rows.size(1);
  const TokenRows index = token_rows(row_token, num_rows, num_tokens);
  const scalar_t* src = rows.const_data_ptr<scalar_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, num_tokens, grain_rows(dim), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(kAccIsOut ? 0 : dim);
    for (int64_t t = begin; t < end; ++t) {
      acc_t* acc = kAccIsOut ? reinterpret_cast<acc_t*>(dst + t * dim) : buffer.data();
      std::fill(acc, acc + dim, acc_t(0));
      for (int64_t j = index.offsets[t]; j < index.offsets[t + 1]; ++j) {
        const int64_t r = index.rows_of_token[j];
        if (w != nullptr) {
          add_weighted_row(acc, src + r * dim, w[r], dim);
        } else {
          add_row(acc, src + r * dim, dim);
        }
      }
      if constexpr (!kAccIsOut) {
        scalar_t* y = dst + t * dim;
        for (int64_t d = 0; d < dim; ++d) {
          y[d] = static_cast<scalar_t>(acc[d]);
        }
      }
    }
  });
}

// <a, b> in opmath with kLanes partial sums: the compiler vectorizes over the lanes (a single
// running sum would force one add at a time under strict IEEE order).
template <typename scalar_t, typename acc_t>
acc_t dot(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t dim) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
    }
  }
  acc_t sum = 0;
  for (; d < dim; ++d) {
    sum += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  }
  for (int l = 0; l < kLanes; ++l) {
    sum += lanes[l];
  }
  return sum;
}

template <typename scalar_t, typename index_t>
void unpermute_backward_kernel(const at::Tensor& grad_out, const at::Tensor& rows,
                               const index_t* row_token, const at::Tensor& weight,
                               at::Tensor& grad_rows, at::Tensor& grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_rows = rows.size(0), dim = rows.size(1);
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x = rows.const_data_ptr<scalar_t>();
  const acc_t* w = weight.const_data_ptr<acc_t>();
  scalar_t* gx = grad_rows.mutable_data_ptr<scalar_t>();
  acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
  at::parallel_for(0, num_rows, grain_rows(2 * dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* __restrict out = gx + r * dim;
      if (row_token[r] < 0) {
        std::fill(out, out + dim, scalar_t(0));
        gw[r] = 0;
        continue;
      }
      const scalar_t* __restrict g_t = g + row_token[r] * dim;
      const acc_t w_r = w[r];
      for (int64_t d = 0; d < dim; ++d) {
        out[d] = static_cast<scalar_t>(static_cast<acc_t>(g_t[d]) * w_r);
      }
      gw[r] = dot<scalar_t, acc_t>(g_t, x + r * dim, dim);
    }
  });
}

}  // namespace

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& row_token) {
  check_permute_args(x, row_token);
  const at::Tensor x_c = x.contiguous();
  const at::Tensor tokens = row_token.contiguous();
  const int64_t num_rows = tokens.size(0), num_tokens = x_c.size(0), dim = x_c.size(1);
  at::Tensor rows = at::empty({num_rows, dim}, x_c.options());
  const size_t row_bytes = static_cast<size_t>(dim) * x_c.element_size();
  const char* src = static_cast<const char*>(x_c.const_data_ptr());
  char* dst = static_cast<char*>(rows.mutable_data_ptr());
  AT_DISPATCH_INDEX_TYPES(tokens.scalar_type(), "moetrain_permute_cpu", [&] {
    const index_t* tok = tokens.const_data_ptr<index_t>();
    check_tokens_in_range(tok, num_rows, num_tokens, "moetrain::permute");
    at::parallel_for(0, num_rows, grain_rows(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        char* row = dst + r * row_bytes;
        if (tok[r] < 0) {
          std::memset(row, 0, row_bytes);
        } else {
          std::memcpy(row, src + tok[r] * row_bytes, row_bytes);
        }
      }
    });
  });
  return rows;
}

at::Tensor unpermute_cpu(const at::Tensor& rows, const at::Tensor& row_token,
                         const std::optional<at::Tensor>& row_weight, int64_t num_tokens) {
  check_unpermute_args(rows, row_token, row_weight, num_tokens);
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor tokens = row_token.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(rows_c.scalar_type());
  at::Tensor weight;  // undefined = weight 1
  if (row_weight.has_value() && row_weight->defined()) {
    weight = row_weight->to(acc_type).contiguous();
  }
  at::Tensor out = at::empty({num_tokens, rows_c.size(1)}, rows_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows_c.scalar_type(), "moetrain_unpermute_cpu", [&] {
        using scalar_t_ = scalar_t;
        AT_DISPATCH_INDEX_TYPES(tokens.scalar_type(), "moetrain_unpermute_cpu", [&] {
          const index_t* tok = tokens.const_data_ptr<index_t>();
          check_tokens_in_range(tok, tokens.size(0), num_tokens, "moetrain::unpermute");
          unpermute_kernel<scalar_t_, index_t>(rows_c, tok, weight, out);
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out,
                                                          const at::Tensor& rows,
                                                          const at::Tensor& row_token,
                                                          const at::Tensor& row_weight) {
  check_unpermute_backward_args(grad_out, rows, row_token, row_weight);
  const at::Tensor g = grad_out.contiguous();  // a stride-0 gradient (from .sum()) is expanded
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor tokens = row_token.contiguous();
  const at::ScalarType acc_type = at::toOpMathType(rows_c.scalar_type());
  const at::Tensor weight = row_weight.to(acc_type).contiguous();
  at::Tensor grad_rows = at::empty_like(rows_c);
  at::Tensor grad_weight = at::empty({rows_c.size(0)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows_c.scalar_type(), "moetrain_unpermute_backward_cpu", [&] {
        using scalar_t_ = scalar_t;
        AT_DISPATCH_INDEX_TYPES(tokens.scalar_type(), "moetrain_unpermute_backward_cpu", [&] {
          const index_t* tok = tokens.const_data_ptr<index_t>();
          check_tokens_in_range(tok, tokens.size(0), g.size(0), "moetrain::unpermute_backward");
          unpermute_backward_kernel<scalar_t_, index_t>(g, rows_c, tok, weight, grad_rows,
                                                        grad_weight);
        });
      });
  return {grad_rows, grad_weight.to(row_weight.scalar_type())};
}

}  // namespace moetrain
