// Weighted BCE-with-logits on the CPU, element-wise over broadcast operands (elementwise.h).
// x logit, y target in [0, 1], w weight, pw pos_weight. Everything from e = exp(-|x|):
//   softplus(+-x) = max(+-x, 0) + log1p(e)        (each branch directly: no softplus(x) - x)
//   sigmoid(x) = 1/(1+e) for x >= 0, e/(1+e) else; sigmoid(-x) the other one (never 1 - sigmoid)
//   L        = w (pw y softplus(-x) + (1-y) softplus(x))
//   dL/dx    = w ((1-y) sigmoid(x) - pw y sigmoid(-x))
//   dL/dy    = w (pw softplus(-x) - softplus(x))
// so at x = +-37, +-40 the tiny terms (e.g. softplus(-40) = 4.2e-18) survive on both branches.
#include <torch/library.h>

#include "elementwise.h"

namespace fusedloss {
namespace {

// What every formula above takes from x: e = exp(-|x|), r = 1 / (1 + e) and log1p(e). One
// function of x for loss and grad, so that gcc computes it once where both are inlined into one
// loop (the one-pass mode), with one division for the sigmoids and log1p's correction.
template <typename A>
struct BceTerms {
  A e, r, l1p;
};
template <typename A>
FL_ALWAYS_INLINE BceTerms<A> bce_terms(A x) {
  const A e = fast_exp_le88(-std::abs(x));
  const A u = A(1) + e;
  const A r = A(1) / u;
  return {e, r, log1p_unit(e, u, r)};
}

// Element i of one run (EwRun, elementwise.h; S the storage type, A = acc_type<S>).
struct BceLoop {
  template <bool kFull, typename S>
  FL_ALWAYS_INLINE acc_type<S> loss(const EwRun<S>& r, int64_t i) const {
    using A = acc_type<S>;
    const A xi = ew_load(r.x[i]), yi = ew_load(r.y[i]);
    const A l1p = bce_terms(xi).l1p;
    const A sp_pos = std::max(xi, A(0)) + l1p;   // softplus(x)
    const A sp_neg = std::max(-xi, A(0)) + l1p;  // softplus(-x)
    const A a = kFull ? r.pw[i] * yi : yi;
    const A l = a * sp_neg + (A(1) - yi) * sp_pos;
    return kFull ? r.w[i] * l : l;
  }
  template <int kMode, bool kFull, typename S>
  FL_ALWAYS_INLINE void grad(const EwRun<S>& r, int64_t i) const {
    using A = acc_type<S>;
    const A xi = ew_load(r.x[i]), yi = ew_load(r.y[i]);
    const BceTerms<A> t = bce_terms(xi);
    const A e = t.e, r1 = t.r;
    const A a = kFull ? r.pw[i] * yi : yi, b = A(1) - yi;
    const A f = ew_go<kMode, kFull>(r, i);  // grad_out * scale
    const A sig_pos = xi >= 0 ? r1 : e * r1;  // sigmoid(x)
    const A sig_neg = xi >= 0 ? e * r1 : r1;  // sigmoid(-x)
    A g = b * sig_pos - a * sig_neg;
    if constexpr (kFull) g = r.w[i] * g;
    ew_store(r.gx + i, g * f);
    if constexpr (kMode == kGradXY) {
      const A l1p = t.l1p;
      const A sp_pos = std::max(xi, A(0)) + l1p;   // softplus(x)
      const A sp_neg = std::max(-xi, A(0)) + l1p;  // softplus(-x)
      A gy = kFull ? r.pw[i] * sp_neg - sp_pos : sp_neg - sp_pos;
      if constexpr (kFull) gy = r.w[i] * gy;
      ew_store(r.gy + i, gy * f);
    }
  }
};

FL_MULTIVERSION float bce_block(int mode, bool full, const EwRun<c10::BFloat16>& r) {
  return ew_dispatch(BceLoop{}, mode, full, r);
}
FL_MULTIVERSION float bce_block(int mode, bool full, const EwRun<float>& r) {
  return ew_dispatch(BceLoop{}, mode, full, r);
}
double bce_block(int mode, bool full, const EwRun<double>& r) {
  return ew_dispatch(BceLoop{}, mode, full, r);
}

struct Bce {
  template <typename S>
  acc_type<S> operator()(int mode, bool full, const EwRun<S>& r) const {
    return bce_block(mode, full, r);
  }
};

at::Tensor bce_fwd(const at::Tensor& input, const at::Tensor& target,
                   const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& pos_weight, int64_t reduction) {
  return std::get<0>(elementwise_run("fusedloss::bce_fwd", input, target, weight, pos_weight,
                                     c10::nullopt, reduction, true, false, false, Bce{}));
}

std::tuple<at::Tensor, at::Tensor> bce_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                           const at::Tensor& target,
                                           const c10::optional<at::Tensor>& weight,
                                           const c10::optional<at::Tensor>& pos_weight,
                                           int64_t reduction, bool grad_input, bool grad_target) {
  auto out = elementwise_run("fusedloss::bce_bwd", input, target, weight, pos_weight, grad_out,
                             reduction, false, grad_input, grad_target, Bce{});
  return {std::get<1>(out), std::get<2>(out)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bce_fwd_grad(const at::Tensor& input, const at::Tensor& target,
                                                const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& pos_weight,
                                                int64_t reduction, double go_value) {
  auto out = elementwise_run("fusedloss::bce_fwd_grad", input, target, weight, pos_weight,
                             c10::nullopt, reduction, true, true, false, Bce{}, go_value);
  return {std::get<0>(out), std::get<1>(out)};
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("bce_fwd", &bce_fwd);
  m.impl("bce_bwd", &bce_bwd);
}

}  // namespace fusedloss
