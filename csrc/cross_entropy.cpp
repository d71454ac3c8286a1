// Softmax cross-entropy over class-index targets, one row at a time.
//   forward:  one read of the row (online lse, x[y], and sum_c w_c x_c for label smoothing)
//   backward: one read of the row and one write of its gradient, from the saved lse, with
//             grad_output (and 1/sum of weights for mean) folded in.
// Measured faster than writing the gradient in forward and scaling it in backward: that costs a
// second write and read of a logits-sized buffer (see bench/bench_cross_entropy.py).
// Row loss, with eps = label_smoothing, w_y = weight[y] (1 without weight), W = sum_c w_c:
//   L = (1-eps) w_y (lse - x_y) + eps/C (W lse - sum_c w_c x_c) + z lse^2
// Gradient, with p = softmax(x), A = (1-eps) w_y + eps/C W + 2 z lse:
//   dL/dx_j = p_j A - eps/C w_j - (1-eps) w_y [j == y]
// The target column is written as A expm1(x_y - lse) + eps/C (W - w_y) + 2 z lse, which avoids
// the cancellation p_y - 1 for confident predictions.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>

#include "common.h"

namespace fusedloss {
namespace {

template <typename T>
inline void ce_grad_impl(const T* x, const T* w, int64_t n, T lse, T a, T k, T scale, T* g) {
  // g = scale * (exp(x - lse) * a - k * w)
  if (w == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) g[i] = scale * (fast_exp(x[i] - lse) * a - k);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) g[i] = scale * (fast_exp(x[i] - lse) * a - k * w[i]);
  }
}
FL_MULTIVERSION void ce_grad_block(const float* x, const float* w, int64_t n, float lse, float a,
                                   float k, float scale, float* g) {
  ce_grad_impl(x, w, n, lse, a, k, scale, g);
}
void ce_grad_block(const double* x, const double* w, int64_t n, double lse, double a, double k,
                   double scale, double* g) {
  ce_grad_impl(x, w, n, lse, a, k, scale, g);
}

// What both passes share: the [N, C, D] geometry, the weights and the option constants.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
struct Rows {
  int64_t N, C, D, sN, sC, sD;
  const scalar_t* x;
  const int64_t* tgt;
  const acc_t* w;  // nullptr: no class weights
  acc_t w_sum, eps, k, z;
  int64_t ignore_index;

  Rows(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
       int64_t ignore, double label_smoothing, double z_loss)
      : N(logits.size(0)), C(logits.size(1)), D(logits.size(2)), sN(logits.stride(0)),
        sC(logits.stride(1)), sD(logits.stride(2)), x(logits.const_data_ptr<scalar_t>()),
        tgt(target.const_data_ptr<int64_t>()),
        w(weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr),
        w_sum(weight.has_value() ? weight->sum().item<acc_t>() : static_cast<acc_t>(C)),
        eps(static_cast<acc_t>(label_smoothing)), k(eps / static_cast<acc_t>(C)),
        z(static_cast<acc_t>(z_loss)), ignore_index(ignore) {}

  const scalar_t* row(int64_t r) const { return x + (r / D) * sN + (r % D) * sD; }
  // The row's target, or -1 for an ignored or out-of-range row (it then has loss and gradient 0).
  int64_t target(int64_t r) const {
    const int64_t y = tgt[r];
    return (y == ignore_index || y < 0 || y >= C) ? -1 : y;
  }
  int64_t grain() const { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }
};

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void ce_forward_rows(const Rows<scalar_t>& R, acc_t* loss, acc_t* lse_out,
                     std::atomic<int64_t>& bad) {
  at::parallel_for(0, R.N * R.D, R.grain(), [&](int64_t begin, int64_t end) {
    acc_t buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = R.target(r);
      if (y < 0) {
        if (R.tgt[r] != R.ignore_index) {
          int64_t none = std::numeric_limits<int64_t>::min();
          bad.compare_exchange_strong(none, R.tgt[r]);  // reported after the loop (IndexError)
        }
        loss[r] = 0;
        lse_out[r] = 0;
        continue;
      }
      const scalar_t* xr = R.row(r);
      OnlineLSE<acc_t> acc;
      acc_t swx = 0;
      for (int64_t c0 = 0; c0 < R.C; c0 += kBlock) {
        const int64_t nb = std::min(kBlock, R.C - c0);
        load_block(xr + c0 * R.sC, R.sC, nb, buf);
        acc.add(buf, nb);
        if (R.eps != 0) swx += block_dot<acc_t>(buf, R.w ? R.w + c0 : nullptr, nb);
      }
      const acc_t lse = acc.lse();
      const acc_t xy = static_cast<acc_t>(xr[y * R.sC]);
      const acc_t wy = R.w ? R.w[y] : acc_t(1);
      // Terms with a zero coefficient are skipped, not multiplied by 0: lse may be huge (inf * 0).
      acc_t l = (1 - R.eps) * wy * (lse - xy);
      if (R.eps != 0) l += R.k * (R.w_sum * lse - swx);
      if (R.z != 0) l += R.z * lse * lse;
      loss[r] = l;
      lse_out[r] = lse;
    }
  });
}

// Writes the gradient through g (any strides; g may be the logits themselves: each element is
// read before it is overwritten, and x_y is read before the row's sweep).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void ce_backward_rows(const Rows<scalar_t>& R, const acc_t* lse_in, const acc_t* scale,
                      bool per_row_scale, scalar_t* g, at::IntArrayRef g_strides) {
  const int64_t gN = g_strides[0], gC = g_strides[1], gD = g_strides[2];
  at::parallel_for(0, R.N * R.D, R.grain(), [&](int64_t begin, int64_t end) {
    acc_t buf[kBlock];
    acc_t gbuf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = R.row(r);
      scalar_t* gr = g + (r / R.D) * gN + (r % R.D) * gD;
      const int64_t y = R.target(r);
      if (y < 0) {
        for (int64_t c = 0; c < R.C; ++c) gr[c * gC] = scalar_t(0);
        continue;
      }
      const acc_t lse = lse_in[r];
      const acc_t s = scale[per_row_scale ? r : 0];
      const acc_t wy = R.w ? R.w[y] : acc_t(1);
      const acc_t xy = static_cast<acc_t>(xr[y * R.sC]);
      const acc_t a = (1 - R.eps) * wy + R.k * R.w_sum + 2 * R.z * lse;
      for (int64_t c0 = 0; c0 < R.C; c0 += kBlock) {
        const int64_t nb = std::min(kBlock, R.C - c0);
        load_block(xr + c0 * R.sC, R.sC, nb, buf);
        ce_grad_block(buf, R.w ? R.w + c0 : nullptr, nb, lse, a, R.k, s, gbuf);
        store_block(gbuf, nb, gr + c0 * gC, gC);
      }
      const acc_t gy = a * std::expm1(xy - lse) + R.k * (R.w_sum - wy) + 2 * R.z * lse;
      gr[y * gC] = static_cast<scalar_t>(s * gy);
    }
  });
}

void check_args(const at::Tensor& logits, const at::Tensor& target,
                const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 3, "fusedloss::cross_entropy: logits must be viewed as [N, C, D]");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.is_contiguous() &&
                  target.numel() == logits.size(0) * logits.size(2),
              "fusedloss::cross_entropy: target must be a contiguous int64 vector of N*D rows");
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == acc_dtype(logits) && weight->is_contiguous() &&
                    weight->numel() == logits.size(1),
                "fusedloss::cross_entropy: weight must be a contiguous vector of C classes in the "
                "accumulation dtype (fp32, fp64 for fp64 logits)");
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& target,
                                                     const c10::optional<at::Tensor>& weight,
                                                     int64_t ignore_index, double label_smoothing,
                                                     double z_loss) {
  check_args(logits, target, weight);
  const int64_t rows = logits.size(0) * logits.size(2);
  auto opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor lse = at::empty({rows}, opts);
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::min()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    Rows<scalar_t> R(logits, target, weight, ignore_index, label_smoothing, z_loss);
    ce_forward_rows(R, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), bad);
  });
  const int64_t b = bad.load();
  TORCH_CHECK_INDEX(b == std::numeric_limits<int64_t>::min(), "fusedloss.cross_entropy: target ",
                    b, " is out of bounds for ", logits.size(1), " classes");
  return {loss, lse};
}

void ce_backward(const at::Tensor& grad_scale, const at::Tensor& logits, const at::Tensor& target,
                 const at::Tensor& lse, const c10::optional<at::Tensor>& weight,
                 int64_t ignore_index, double label_smoothing, double z_loss, at::Tensor& grad) {
  check_args(logits, target, weight);
  const int64_t rows = logits.size(0) * logits.size(2);
  TORCH_CHECK(lse.scalar_type() == acc_dtype(logits) && lse.is_contiguous() && lse.numel() == rows,
              "fusedloss::cross_entropy_bwd: lse must be the forward's per-row lse");
  TORCH_CHECK(grad_scale.scalar_type() == acc_dtype(logits) && grad_scale.is_contiguous() &&
                  (grad_scale.numel() == 1 || grad_scale.numel() == rows),
              "fusedloss::cross_entropy_bwd: grad_scale must be a scalar or one per row, in the "
              "accumulation dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    Rows<scalar_t> R(logits, target, weight, ignore_index, label_smoothing, z_loss);
    ce_backward_rows(R, lse.const_data_ptr<acc_t>(), grad_scale.const_data_ptr<acc_t>(),
                     grad_scale.numel() != 1, grad.data_ptr<scalar_t>(),
                     grad.strides());
  });
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_scale, const at::Tensor& logits,
                             const at::Tensor& target, const at::Tensor& lse,
                             const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                             double label_smoothing, double z_loss) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  ce_backward(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing, z_loss, grad);
  return grad;
}

void cross_entropy_bwd_inplace(const at::Tensor& grad_scale, at::Tensor& logits,
                               const at::Tensor& target, const at::Tensor& lse,
                               const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                               double label_smoothing, double z_loss) {
  ce_backward(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing, z_loss,
              logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace);
}

}  // namespace fusedloss
