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

// Element i of one run (EwRun, elementwise.h; S the storage type, A = acc_type<S>). No
// weights: the full loop only differs in reading grad_out per element.
template <bool kLogTarget>
struct KlLoop {
  // The loss and both gradients' factors (before grad_out) of element i.
  template <typename S>
  FL_ALWAYS_INLINE void terms(const EwRun<S>& r, int64_t i, acc_type<S>& l, acc_type<S>& dx,
                              acc_type<S>& dy) const {
    using A = acc_type<S>;
    constexpr A kInf = std::numeric_limits<A>::infinity();
    const A kNaN = std::numeric_limits<A>::quiet_NaN();
    const A xi = ew_load(r.x[i]), yi = ew_load(r.y[i]);
    if constexpr (kLogTarget) {
      const A e = fast_exp(yi);
      const bool zero = yi == -kInf;  // exp(y) = 0: the term is 0 (torch: 0 * inf = NaN)
      l = zero ? A(0) : e * (yi - xi);
      dx = -e;
      dy = zero ? A(0) : e * (yi - xi + A(1));
    } else {
      // fast_log is right for finite y > 0 and finite elsewhere (log(0) = -104, log(inf) =
      // 88.7, garbage for y < 0 or NaN): xlogy(y, y) = y log y then holds at y = 0 (0) and
      // +inf (inf), and y < 0 takes NaN (NaN y stays NaN). One select: the selects that made
      // log y exact first cost more than the log (AVX2 code).
      A ly = fast_log(yi);
      // (fp64's fast_log is std::log, -inf at 0: clamped to stay finite there)
      if constexpr (std::is_same_v<A, double>) ly = std::max(ly, std::numeric_limits<A>::lowest());
      const A ylogy = yi >= 0 ? yi * ly : kNaN;
      const A yx = (yi == 0 && xi == -kInf) ? A(0) : yi * xi;
      l = ylogy - yx;
      dx = -yi;
      // torch: xlogy's backward is 0/0 at y = 0; log(+inf) = inf; NaN for y < 0 or NaN
      dy = yi > 0 ? (yi < kInf ? ly : kInf) + A(1) - xi : kNaN;
    }
  }
  template <bool kFull, typename S>
  FL_ALWAYS_INLINE acc_type<S> loss(const EwRun<S>& r, int64_t i) const {
    acc_type<S> l, dx, dy;
    terms(r, i, l, dx, dy);
    return l;
  }
  template <int kMode, bool kFull, typename S>
  FL_ALWAYS_INLINE void grad(const EwRun<S>& r, int64_t i) const {
    acc_type<S> l, dx, dy;
    terms(r, i, l, dx, dy);
    const acc_type<S> f = ew_go<kMode, kFull>(r, i);  // grad_out * scale
    ew_store(r.gx + i, dx * f);
    if constexpr (kMode == kGradXY) ew_store(r.gy + i, dy * f);
  }
};

template <typename S>
FL_ALWAYS_INLINE acc_type<S> kl_modes(int mode, bool full, bool log_target, const EwRun<S>& r) {
  return log_target ? ew_dispatch(KlLoop<true>{}, mode, full, r)
                    : ew_dispatch(KlLoop<false>{}, mode, full, r);
}
FL_MULTIVERSION float kl_block(int mode, bool full, bool log_target, const EwRun<float>& r) {
  return kl_modes(mode, full, log_target, r);
}
FL_MULTIVERSION float kl_block(int mode, bool full, bool log_target,
                               const EwRun<c10::BFloat16>& r) {
  return kl_modes(mode, full, log_target, r);
}
double kl_block(int mode, bool full, bool log_target, const EwRun<double>& r) {
  return kl_modes(mode, full, log_target, r);
}

struct KlDiv {
  bool log_target;
  template <typename S>
  acc_type<S> operator()(int mode, bool full, const EwRun<S>& r) const {
    return kl_block(mode, full, log_target, r);
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

std::tuple<at::Tensor, at::Tensor> kl_div_fwd_grad(const at::Tensor& input,
                                                   const at::Tensor& target, bool log_target,
                                                   int64_t reduction, double go_value) {
  auto out = elementwise_run("fusedloss::kl_div_fwd_grad", input, target, c10::nullopt,
                             c10::nullopt, c10::nullopt, reduction, true, true, false,
                             KlDiv{log_target}, go_value);
  return {std::get<0>(out), std::get<1>(out)};
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("kl_div_fwd", &kl_div_fwd);
  m.impl("kl_div_bwd", &kl_div_bwd);
}

}  // namespace fusedloss
