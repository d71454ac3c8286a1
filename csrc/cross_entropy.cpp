// Softmax cross-entropy over class-index targets, one row at a time:
//   pass 1 (one read of the row): online lse, x[y], and sum_c w_c x_c for label smoothing
//   pass 2 (when a gradient is needed): write the gradient.
// Row loss, with eps = label_smoothing, w_y = weight[y] (1 without weight), W = sum_c w_c:
//   L = (1-eps) w_y (lse - x_y) + eps/C (W lse - sum_c w_c x_c) + z lse^2
// Gradient, with p = softmax(x), A = (1-eps) w_y + eps/C W + 2 z lse:
//   dL/dx_j = p_j A - eps/C w_j - (1-eps) w_y [j == y]
// The target column is written as A expm1(x_y - lse) + eps/C (W - w_y) + 2 z lse, which avoids
// the cancellation p_y - 1 for confident predictions.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
void ce_rows(const at::Tensor& x, const int64_t* tgt, const acc_t* w, acc_t w_sum, acc_t scale,
             int64_t ignore_index, acc_t eps, acc_t z, scalar_t* g, at::IntArrayRef g_strides,
             acc_t* loss, acc_t* lse_out, std::atomic<int64_t>& bad) {
  const int64_t N = x.size(0), C = x.size(1), D = x.size(2);
  const int64_t sN = x.stride(0), sC = x.stride(1), sD = x.stride(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t gN = g ? g_strides[0] : 0, gC = g ? g_strides[1] : 0, gD = g ? g_strides[2] : 0;
  const acc_t k = eps / static_cast<acc_t>(C);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));

  at::parallel_for(0, N * D, grain, [&](int64_t begin, int64_t end) {
    acc_t buf[kBlock];
    acc_t gbuf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / D, s = r % D;
      const scalar_t* xr = xp + n * sN + s * sD;
      scalar_t* gr = g ? g + n * gN + s * gD : nullptr;
      const int64_t y = tgt[r];
      const bool valid = y != ignore_index;
      const bool in_range = y >= 0 && y < C;
      if (valid && !in_range) {
        int64_t none = std::numeric_limits<int64_t>::min();
        bad.compare_exchange_strong(none, y);  // reported after the loop, as an IndexError
      }
      if (!valid || !in_range) {
        loss[r] = 0;
        lse_out[r] = 0;
        if (gr) {
          for (int64_t c = 0; c < C; ++c) gr[c * gC] = scalar_t(0);
        }
        continue;
      }
      OnlineLSE<acc_t> acc;
      acc_t swx = 0;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t nb = std::min(kBlock, C - c0);
        load_block(xr + c0 * sC, sC, nb, buf);
        acc.add(buf, nb);
        if (eps != 0) swx += block_dot<acc_t>(buf, w ? w + c0 : nullptr, nb);
      }
      const acc_t lse = acc.lse();
      const acc_t xy = static_cast<acc_t>(xr[y * sC]);
      const acc_t wy = w ? w[y] : acc_t(1);
      // Terms with a zero coefficient are skipped, not multiplied by 0: lse may be huge (inf * 0).
      acc_t l = (1 - eps) * wy * (lse - xy);
      if (eps != 0) l += k * (w_sum * lse - swx);
      if (z != 0) l += z * lse * lse;
      loss[r] = l;
      lse_out[r] = lse;
      if (!gr) continue;
      const acc_t a = (1 - eps) * wy + k * w_sum + 2 * z * lse;
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t nb = std::min(kBlock, C - c0);
        load_block(xr + c0 * sC, sC, nb, buf);
        ce_grad_block(buf, w ? w + c0 : nullptr, nb, lse, a, k, scale, gbuf);
        store_block(gbuf, nb, gr + c0 * gC, gC);
      }
      const acc_t gy = a * std::expm1(xy - lse) + k * (w_sum - wy) + 2 * z * lse;
      gr[y * gC] = static_cast<scalar_t>(scale * gy);
    }
  });
}

void check_args(const at::Tensor& logits, const at::Tensor& target,
                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& scale) {
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
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == 1, "fusedloss::cross_entropy: grad_scale must be a scalar");
  }
}

std::tuple<at::Tensor, at::Tensor> ce_forward(const at::Tensor& logits, const at::Tensor& target,
                                              const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& grad_scale,
                                              int64_t ignore_index, double label_smoothing,
                                              double z_loss, at::Tensor* grad) {
  check_args(logits, target, weight, grad_scale);
  const int64_t rows = logits.size(0) * logits.size(2);
  auto opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor loss = at::empty({rows}, opts);
  at::Tensor lse = at::empty({rows}, opts);
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::min()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedloss_ce", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* w = weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr;
    const acc_t w_sum = weight.has_value() ? weight->sum().item<acc_t>()
                                           : static_cast<acc_t>(logits.size(1));
    ce_rows<scalar_t>(logits, target.const_data_ptr<int64_t>(), w, w_sum,
                      static_cast<acc_t>(scalar_or(grad_scale, 1.0)), ignore_index,
                      static_cast<acc_t>(label_smoothing), static_cast<acc_t>(z_loss),
                      grad ? grad->data_ptr<scalar_t>() : nullptr,
                      grad ? grad->strides() : at::IntArrayRef(), loss.data_ptr<acc_t>(),
                      lse.data_ptr<acc_t>(), bad);
  });
  const int64_t b = bad.load();
  TORCH_CHECK_INDEX(b == std::numeric_limits<int64_t>::min(), "fusedloss.cross_entropy: target ",
                    b, " is out of bounds for ", logits.size(1), " classes");
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, bool compute_grad) {
  at::Tensor grad = compute_grad ? at::empty(logits.sizes(), logits.options())
                                 : at::empty({0}, logits.options());
  auto [loss, lse] = ce_forward(logits, target, weight, grad_scale, ignore_index, label_smoothing,
                                z_loss, compute_grad ? &grad : nullptr);
  return {loss, lse, grad};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace(
    at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double z_loss) {
  // Each element is read (pass 2) before it is overwritten by its own gradient; x_y is kept
  // from pass 1, so writing over the logits is safe.
  return ce_forward(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                    &logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace);
}

}  // namespace fusedloss
