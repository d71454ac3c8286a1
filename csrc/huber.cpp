// Huber and SmoothL1 on the CPU, element-wise over broadcast operands (elementwise.h), as one
// formula in d = x - y with threshold t, quadratic factor k and linear factor m:
//   L     = w * (|d| < t ? k d^2 / 2 : m (|d| - t/2))
//   dL/dx = w * (|d| < t ? k d : m sign(d)),   dL/dy = -dL/dx,   sign(0) = 0
// Huber(delta): t = delta, k = 1, m = delta.  SmoothL1(beta): t = beta, k = 1/beta, m = 1.
// As k t = m, the gradient is c = clamp(k d, -m, m) and the loss c (d - c / 2k): no branch, no
// sign (NaN propagates through both; Huber's loss rounds as torch's formula does, SmoothL1's
// quadratic part within a few ulp of it). SmoothL1 with beta = 0 (exact L1; k would be 1/0) or
// beta < 1e-30 (1/beta near fp32's largest value, infinite for a subnormal beta) takes the
// branchy formula instead, its quadratic part as torch's, d/beta (never 0 * inf), and beta = 0
// never on the quadratic side (|d| < 0 is false). The factors are fp32 (fp64 for fp64 inputs).
#include <torch/library.h>

#include "elementwise.h"

namespace fusedloss {
namespace {

// Element i of one run (EwRun, elementwise.h; S the storage type, A = acc_type<S>). kClamp:
// the clamp form; else the branchy one (SmoothL1 with beta = 0 or tiny: m = 1, k t = 1).
template <typename A, bool kClamp>
struct HuberLoop {
  A t, k, m, hk;  // hk = 1 / 2k
  template <bool kFull, typename S>
  FL_ALWAYS_INLINE A loss(const EwRun<S>& r, int64_t i) const {
    const A d = ew_load(r.x[i]) - ew_load(r.y[i]);
    A l;
    if constexpr (kClamp) {
      const A c = std::min(std::max(k * d, -m), m);
      l = c * (d - c * hk);
    } else {
      const A ad = std::abs(d);
      l = ad < t ? A(0.5) * d * (d / t) : m * (ad - A(0.5) * t);
    }
    return kFull ? r.w[i] * l : l;
  }
  template <int kMode, bool kFull, typename S>
  FL_ALWAYS_INLINE void grad(const EwRun<S>& r, int64_t i) const {
    const A d = ew_load(r.x[i]) - ew_load(r.y[i]);
    A g;
    if constexpr (kClamp) {
      g = std::min(std::max(k * d, -m), m);  // (NaN: both comparisons fail, d kept)
    } else {
      const A sgn = d > 0 ? A(1) : (d < 0 ? A(-1) : d);  // 0 -> 0, NaN -> NaN
      g = std::abs(d) < t ? d / t : m * sgn;
    }
    if constexpr (kFull) g = r.w[i] * g;
    g = g * ew_go<kMode, kFull>(r, i);
    ew_store(r.gx + i, g);
    if constexpr (kMode == kGradXY) ew_store(r.gy + i, -g);
  }
};

template <typename S, typename A>
FL_ALWAYS_INLINE A huber_modes(int mode, bool full, const EwRun<S>& r, const HuberLoop<A, true>& p) {
  if (p.t > 0 && p.k <= A(1e30)) return ew_dispatch(p, mode, full, r);
  return ew_dispatch(HuberLoop<A, false>{p.t, p.k, p.m, p.hk}, mode, full, r);
}

using HuberParams = HuberLoop<float, true>;
FL_MULTIVERSION float huber_block(int mode, bool full, const EwRun<float>& r,
                                  const HuberParams& p) {
  return huber_modes(mode, full, r, p);
}
FL_MULTIVERSION float huber_block(int mode, bool full, const EwRun<c10::BFloat16>& r,
                                  const HuberParams& p) {
  return huber_modes(mode, full, r, p);
}
double huber_block(int mode, bool full, const EwRun<double>& r, const HuberLoop<double, true>& p) {
  return huber_modes(mode, full, r, p);
}

struct Huber {
  double delta;
  bool smooth_l1;
  template <typename S>
  acc_type<S> operator()(int mode, bool full, const EwRun<S>& r) const {
    using A = acc_type<S>;
    const A t = static_cast<A>(delta);
    const A k = !smooth_l1 ? A(1) : (delta > 0 ? A(1) / t : A(0));
    const A m = smooth_l1 ? A(1) : t;
    return huber_block(mode, full, r, HuberLoop<A, true>{t, k, m, A(0.5) / k});
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

std::tuple<at::Tensor, at::Tensor> huber_fwd_grad(const at::Tensor& input,
                                                  const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& weight,
                                                  double delta, bool smooth_l1, int64_t reduction,
                                                  double go_value) {
  check_delta(delta, smooth_l1);
  auto out = elementwise_run("fusedloss::huber_fwd_grad", input, target, weight, c10::nullopt,
                             c10::nullopt, reduction, true, true, false, Huber{delta, smooth_l1},
                             go_value);
  return {std::get<0>(out), std::get<1>(out)};
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("huber_fwd", &huber_fwd);
  m.impl("huber_bwd", &huber_bwd);
}

}  // namespace fusedloss
