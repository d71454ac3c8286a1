// Huber and SmoothL1 on the CPU, element-wise over broadcast operands (elementwise.h), as one
// formula in d = x - y with threshold t, quadratic factor k and linear factor m:
//   L     = w * (|d| < t ? k d^2 / 2 : m (|d| - t/2))
//   dL/dx = w * (|d| < t ? k d : m sign(d)),   dL/dy = -dL/dx,   sign(0) = 0
// Huber(delta): t = delta, k = 1, m = delta.  SmoothL1(beta): t = beta, k = 1/beta, m = 1;
// beta = 0 never takes the quadratic branch (|d| < 0 is false), so it is exact L1 (k = 0 then,
// never 1/0). The factors are fp32 (fp64 for fp64 inputs).
#include <torch/library.h>

#include "elementwise.h"

namespace fusedloss {
namespace {

template <int kMode, typename T>
FL_ALWAYS_INLINE T huber_impl(int64_t n, const T* x, const T* y, const T* w, const T* go, T scale,
                              T t, T k, T m, T* loss, T* gx, T* gy) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const T d = x[i] - y[i];
    const T ad = std::abs(d);
    const bool quad = ad < t;
    if constexpr (kMode == kLossSum || kMode == kLossStore) {
      const T l = w[i] * (quad ? T(0.5) * k * d * d : m * (ad - T(0.5) * t));
      if constexpr (kMode == kLossSum) total += l;
      else loss[i] = l;
    } else {
      const T sgn = d > 0 ? T(1) : (d < 0 ? T(-1) : d);  // 0 -> 0, NaN -> NaN
      const T g = w[i] * (quad ? k * d : m * sgn) * (scale * go[i]);
      gx[i] = g;
      gy[i] = -g;
    }
  }
  return total;
}
template <typename T>
FL_ALWAYS_INLINE T huber_modes(int mode, int64_t n, const T* x, const T* y, const T* w,
                               const T* go, T scale, T t, T k, T m, T* loss, T* gx, T* gy) {
  switch (mode) {
    case kLossSum: return huber_impl<kLossSum>(n, x, y, w, go, scale, t, k, m, loss, gx, gy);
    case kLossStore: return huber_impl<kLossStore>(n, x, y, w, go, scale, t, k, m, loss, gx, gy);
    default: return huber_impl<kGradXY>(n, x, y, w, go, scale, t, k, m, loss, gx, gy);  // gy free
  }
}
FL_MULTIVERSION float huber_block(int mode, int64_t n, const float* x, const float* y,
                                  const float* w, const float* go, float scale, float t, float k,
                                  float m, float* loss, float* gx, float* gy) {
  return huber_modes(mode, n, x, y, w, go, scale, t, k, m, loss, gx, gy);
}
double huber_block(int mode, int64_t n, const double* x, const double* y, const double* w,
                   const double* go, double scale, double t, double k, double m, double* loss,
                   double* gx, double* gy) {
  return huber_modes(mode, n, x, y, w, go, scale, t, k, m, loss, gx, gy);
}

struct Huber {
  double delta;
  bool smooth_l1;
  template <typename T>
  T operator()(int mode, int64_t n, const T* x, const T* y, const T* w, const T* /*pw*/,
               const T* go, T scale, T* loss, T* gx, T* gy) const {
    const T t = static_cast<T>(delta);
    const T k = !smooth_l1 ? T(1) : (delta > 0 ? T(1) / t : T(0));
    const T m = smooth_l1 ? T(1) : t;
    return huber_block(mode, n, x, y, w, go, scale, t, k, m, loss, gx, gy);
  }
};

void check_delta(double delta, bool smooth_l1) {
  TORCH_CHECK(smooth_l1 ? delta >= 0 : delta > 0,
              "fusedloss::huber: delta must be > 0 (beta >= 0 for smooth_l1)");
}

at::Tensor huber_fwd(const at::Tensor& input, const at::Tensor& target,
                     const c10::optional<at::Tensor>& weight, double delta, bool smooth_l1,
                     int64_t reduction) {
  check_delta(delta, smooth_l1);
  return std::get<0>(elementwise_run("fusedloss::huber_fwd", input, target, weight, c10::nullopt,
                                     c10::nullopt, reduction, true, false, false,
                                     Huber{delta, smooth_l1}));
}

std::tuple<at::Tensor, at::Tensor> huber_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                             const at::Tensor& target,
                                             const c10::optional<at::Tensor>& weight,
                                             double delta, bool smooth_l1, int64_t reduction,
                                             bool grad_input, bool grad_target) {
  check_delta(delta, smooth_l1);
  auto out = elementwise_run("fusedloss::huber_bwd", input, target, weight, c10::nullopt, grad_out,
                             reduction, false, grad_input, grad_target, Huber{delta, smooth_l1});
  return {std::get<1>(out), std::get<2>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("huber_fwd", &huber_fwd);
  m.impl("huber_bwd", &huber_bwd);
}

}  // namespace fusedloss
