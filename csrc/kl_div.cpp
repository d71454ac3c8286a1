// KL divergence (torch.nn.functional.kl_div) on the CPU, element-wise over broadcast operands
// (elementwise.h). x is a log-probability, y the target (a probability, or a log-probability if
// log_target):
//   L     = xlogy(y, y) - y x          dL/dx = -y      dL/dy = log y + 1 - x
//   L     = e^y (y - x)   (log_target) dL/dx = -e^y    dL/dy = e^y (y - x + 1)
// as torch computes them, with one difference: a zero target (y = 0, or y = -inf in log space)
// contributes 0 to the loss (and, in log space, 0 to both gradients) where torch's 0 * inf
// gives NaN (y = 0 with x = -inf; any x with y = -inf). Torch's other NaNs are kept: a negative
// probability target, and dL/dy at y = 0 (torch's xlogy backward gives 0/0 there; the true
// derivative is -inf).
#include <torch/library.h>

#include "elementwise.h"

namespace fusedloss {
namespace {

template <int kMode, bool kLogTarget, typename T>
FL_ALWAYS_INLINE T kl_impl(int64_t n, const T* x, const T* y, const T* go, T scale, T* loss, T* gx,
                           T* gy) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const T kNaN = std::numeric_limits<T>::quiet_NaN();
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i], yi = y[i];
    T l, dx, dy;
    if constexpr (kLogTarget) {
      const T e = fast_exp(yi);
      const bool zero = yi == -kInf;  // exp(y) = 0: the term is 0 (torch: 0 * inf = NaN)
      l = zero ? T(0) : e * (yi - xi);
      dx = -e;
      dy = zero ? T(0) : e * (yi - xi + T(1));
    } else {
      // log y for 0 < y < inf (fast_log handles finite y > 0 only); +inf -> +inf, else NaN
      const T ly = yi > 0 && yi < kInf ? fast_log(yi) : (yi == kInf ? kInf : kNaN);
      const T ylogy = yi == 0 ? T(0) : yi * ly;  // xlogy(y, y), NaN for y < 0 or NaN
      const T yx = (yi == 0 && xi == -kInf) ? T(0) : yi * xi;
      l = ylogy - yx;
      dx = -yi;
      dy = yi == 0 ? kNaN : ly + T(1) - xi;  // torch: xlogy's backward is 0/0 at y = 0
    }
    if constexpr (kMode == kLossSum) total += l;
    if constexpr (kMode == kLossStore) loss[i] = l;
    if constexpr (kMode == kGradX || kMode == kGradXY) gx[i] = dx * (scale * go[i]);
    if constexpr (kMode == kGradXY) gy[i] = dy * (scale * go[i]);
  }
  return total;
}
template <bool kLogTarget, typename T>
FL_ALWAYS_INLINE T kl_modes(int mode, int64_t n, const T* x, const T* y, const T* go, T scale,
                            T* loss, T* gx, T* gy) {
  switch (mode) {
    case kLossSum: return kl_impl<kLossSum, kLogTarget>(n, x, y, go, scale, loss, gx, gy);
    case kLossStore: return kl_impl<kLossStore, kLogTarget>(n, x, y, go, scale, loss, gx, gy);
    case kGradX: return kl_impl<kGradX, kLogTarget>(n, x, y, go, scale, loss, gx, gy);
    default: return kl_impl<kGradXY, kLogTarget>(n, x, y, go, scale, loss, gx, gy);
  }
}
FL_MULTIVERSION float kl_block(int mode, bool log_target, int64_t n, const float* x,
                               const float* y, const float* go, float scale, float* loss,
                               float* gx, float* gy) {
  return log_target ? kl_modes<true>(mode, n, x, y, go, scale, loss, gx, gy)
                    : kl_modes<false>(mode, n, x, y, go, scale, loss, gx, gy);
}
double kl_block(int mode, bool log_target, int64_t n, const double* x, const double* y,
                const double* go, double scale, double* loss, double* gx, double* gy) {
  return log_target ? kl_modes<true>(mode, n, x, y, go, scale, loss, gx, gy)
                    : kl_modes<false>(mode, n, x, y, go, scale, loss, gx, gy);
}

struct KlDiv {
  bool log_target;
  template <typename T>
  T operator()(int mode, int64_t n, const T* x, const T* y, const T* /*w*/, const T* /*pw*/,
               const T* go, T scale, T* loss, T* gx, T* gy) const {
    return kl_block(mode, log_target, n, x, y, go, scale, loss, gx, gy);
  }
};

at::Tensor kl_div_fwd(const at::Tensor& input, const at::Tensor& target, bool log_target,
                      int64_t reduction) {
  return std::get<0>(elementwise_run("fusedloss::kl_div_fwd", input, target, c10::nullopt,
                                     c10::nullopt, c10::nullopt, reduction, true, false, false,
                                     KlDiv{log_target}));
}

std::tuple<at::Tensor, at::Tensor> kl_div_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                              const at::Tensor& target, bool log_target,
                                              int64_t reduction, bool grad_input,
                                              bool grad_target) {
  auto out = elementwise_run("fusedloss::kl_div_bwd", input, target, c10::nullopt, c10::nullopt,
                             grad_out, reduction, false, grad_input, grad_target,
                             KlDiv{log_target});
  return {std::get<1>(out), std::get<2>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("kl_div_fwd", &kl_div_fwd);
  m.impl("kl_div_bwd", &kl_div_bwd);
}

}  // namespace fusedloss
