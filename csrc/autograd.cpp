// Whole-loss ops with their autograd in C++: fusedloss::cross_entropy and
// fusedloss::elementwise_loss (BCE-with-logits, Huber / SmoothL1).
//
// Why: on a small batch (32 x 10) the time of a loss is per-call overhead, not memory traffic. A
// Python autograd.Function, its ctx and a dozen small tensor ops from Python cost 2-3x what torch's
// own cross_entropy costs in all. Here one op call from Python runs the forward kernel, the
// reduction and the autograd bookkeeping in C++, and backward runs without entering Python.
// The kernels are the same ops as the Python path's (called through the dispatcher, so CUDA
// tensors reach the Triton kernels registered for "cuda"); the Python path stays for what these
// ops do not cover (probability targets, inplace_backward, broadcast operands, other backends).
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace fusedloss {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// t in dtype d / contiguous, without calling an op that would return t itself (ops below autograd
// must not return their inputs: torch.library.opcheck's schema test).
Tensor cast(const Tensor& t, at::ScalarType d) { return t.scalar_type() == d ? t : t.to(d); }
Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

at::ScalarType acc_of(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- cross-entropy over class-index targets ----------------------------------------------------

// input (C,), (N, C) or (N, C, d1..dk) viewed as [N, C, D] (as fusedloss/cross_entropy.py does).
Tensor rows3d(const Tensor& x) {
  if (x.dim() == 1) return x.is_contiguous() ? x.view({1, -1, 1}) : x.unsqueeze(0).unsqueeze(-1);
  if (x.dim() == 2) return x.unsqueeze(-1);
  return x.dim() == 3 ? x : x.flatten(2);  // (flatten of 3 dims returns x itself: not an op)
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using CeFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                         int64_t, double, double);
using CeBwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     const optional<Tensor>&, int64_t, double, double);

struct CEForward {
  Tensor out, t, lse, denom;  // denom: the mean's, as a device tensor (generic path)
  double denom_host = 0;      // ... or as a number (plain CPU tensors; 0 = none)
  optional<Tensor> w;
};

// Real CPU memory: not a meta, fake (Python) or functional tensor, whose values cannot be read.
bool plain_cpu(const Tensor& t) {
  return t.device().is_cpu() &&
         !t.key_set().has_any(
             c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// reduction: 0 none, 1 mean, 2 sum. The mean divides by the sum of weight[target] over
// non-ignored rows (their count without weights), a device tensor: no host sync.
CEForward ce_forward(const Tensor& input, const Tensor& target, const optional<Tensor>& weight,
                     int64_t reduction, int64_t ignore_index, double label_smoothing,
                     double z_loss, at::ScalarType out_dtype) {
  const Tensor x3 = rows3d(input);
  const auto acc = acc_of(input);
  CEForward f;
  f.t = dense(cast(target.reshape(-1), at::kLong));
  if (weight.has_value() && weight->defined()) f.w = dense(cast(*weight, acc));
  Tensor loss;
  static auto fwd = typed_op<CeFwd>("fusedloss::cross_entropy_fwd");
  std::tie(loss, f.lse) = fwd.call(x3, f.t, f.w, ignore_index, label_smoothing, z_loss);
  if (reduction == 0) {
    f.out = loss.view_symint(target.sym_sizes());
  } else if (plain_cpu(loss)) {
    // One loop over the rows instead of four small tensor ops (a small batch's time is per-call
    // overhead), accumulated in fp64; the mean's denominator kept as a number for backward.
    double sum = 0, den = 0;
    AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "ce_reduce", [&] {
      const scalar_t* l = loss.const_data_ptr<scalar_t>();
      const int64_t* t = f.t.const_data_ptr<int64_t>();
      const scalar_t* w = f.w.has_value() ? f.w->const_data_ptr<scalar_t>() : nullptr;
      const int64_t C = x3.size(1);
      for (int64_t r = 0; r < loss.numel(); ++r) {
        sum += static_cast<double>(l[r]);
        if (t[r] == ignore_index) continue;
        den += w ? static_cast<double>(w[std::clamp<int64_t>(t[r], 0, C - 1)]) : 1.0;
      }
    });
    if (reduction == 1) {
      f.denom_host = den;
      sum /= den;  // 0 / 0 = NaN for an all-ignored batch, as torch
    }
    f.out = at::scalar_tensor(sum, loss.options());
  } else if (reduction == 2) {
    f.out = loss.sum();
  } else {
    const Tensor valid = f.t.ne(ignore_index);
    if (f.w.has_value()) {
      const Tensor wy = f.w->index_select(0, f.t.clamp(0, x3.sym_size(1) - 1));
      f.denom = at::where(valid, wy, 0.0).sum();
    } else {
      f.denom = valid.sum(acc);
    }
    f.out = loss.sum().div(f.denom);
  }
  f.out = cast(f.out, out_dtype);
  return f;
}

class CrossEntropyFn : public torch::autograd::Function<CrossEntropyFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& target,
                        const optional<Tensor>& weight, int64_t reduction, int64_t ignore_index,
                        double label_smoothing, double z_loss, at::ScalarType out_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    CEForward f = ce_forward(input, target, weight, reduction, ignore_index, label_smoothing,
                             z_loss, out_dtype);
    ctx->save_for_backward({input});
    ctx->saved_data["t"] = f.t;
    ctx->saved_data["lse"] = f.lse;
    ctx->saved_data["denom"] = f.denom;
    ctx->saved_data["denom_host"] = f.denom_host;
    ctx->saved_data["w"] = f.w;
    ctx->saved_data["options"] = std::make_tuple(ignore_index, label_smoothing, z_loss);
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(8);
    const Tensor& go = grad_outputs[0];
    if (!go.defined() || !ctx->needs_input_grad(0)) return grads;
    const Tensor input = ctx->get_saved_variables()[0];
    const Tensor lse = ctx->saved_data["lse"].toTensor();
    const Tensor denom = ctx->saved_data["denom"].toTensor();
    const auto options = ctx->saved_data["options"].to<std::tuple<int64_t, double, double>>();
    // grad_output (one per row for 'none'), times 1/sum of weights for mean, in the acc dtype.
    Tensor scale;
    const double denom_host = ctx->saved_data["denom_host"].toDouble();
    if (plain_cpu(go) && go.numel() == 1) {  // a number on the CPU: no tensor ops
      const double g = go.item<double>();
      scale = at::scalar_tensor(denom_host != 0 ? g / denom_host : g, lse.options()).reshape({1});
    } else {
      scale = cast(go.reshape(-1), lse.scalar_type());
      if (denom.defined()) scale = scale.div(denom);
      if (denom_host != 0) scale = scale.div(denom_host);
    }
    static auto bwd = typed_op<CeBwd>("fusedloss::cross_entropy_bwd");
    const Tensor grad = bwd.call(dense(scale), rows3d(input), ctx->saved_data["t"].toTensor(), lse,
                                 ctx->saved_data["w"].toOptional<Tensor>(), std::get<0>(options),
                                 std::get<1>(options), std::get<2>(options));
    grads[0] = grad.view_symint(input.sym_sizes());
    return grads;
  }
};

Tensor cross_entropy_autograd(const Tensor& input, const Tensor& target,
                              const optional<Tensor>& weight, int64_t reduction,
                              int64_t ignore_index, double label_smoothing, double z_loss,
                              at::ScalarType out_dtype) {
  return CrossEntropyFn::apply(input, target, weight, reduction, ignore_index, label_smoothing,
                               z_loss, out_dtype);
}

// Below autograd (inference mode, tracing): the forward alone.
Tensor cross_entropy_plain(const Tensor& input, const Tensor& target,
                           const optional<Tensor>& weight, int64_t reduction,
                           int64_t ignore_index, double label_smoothing, double z_loss,
                           at::ScalarType out_dtype) {
  return ce_forward(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                    out_dtype)
      .out;
}

// ---- element-wise losses: input and target of one shape and dtype, contiguous, no weights ------

using EwFwd = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&,
                     const optional<Tensor>&, int64_t);
using EwBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                         const optional<Tensor>&, const optional<Tensor>&, int64_t,
                                         bool, bool);
using HuberFwd = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, double, bool,
                        int64_t);
using HuberBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                            const optional<Tensor>&, double, bool, int64_t, bool,
                                            bool);

constexpr int64_t kBce = 0;  // the other kind, 1, is Huber / SmoothL1

// The kernels take 4-d views; a contiguous tensor is one run.
Tensor flat4(const Tensor& t) { return t.reshape_symint({1, 1, 1, t.sym_numel()}); }

Tensor ew_forward(int64_t kind, const Tensor& input, const Tensor& target, double delta,
                  bool smooth_l1, int64_t reduction, at::ScalarType out_dtype) {
  const Tensor x4 = flat4(input), y4 = flat4(target);
  Tensor loss;
  if (kind == kBce) {
    static auto fwd = typed_op<EwFwd>("fusedloss::bce_fwd");
    loss = fwd.call(x4, y4, c10::nullopt, c10::nullopt, reduction);
  } else {
    static auto fwd = typed_op<HuberFwd>("fusedloss::huber_fwd");
    loss = fwd.call(x4, y4, c10::nullopt, delta, smooth_l1, reduction);
  }
  return cast(reduction == 0 ? loss.view_symint(input.sym_sizes()) : loss, out_dtype);
}

class ElementwiseFn : public torch::autograd::Function<ElementwiseFn> {
 public:
  static Tensor forward(AutogradContext* ctx, int64_t kind, const Tensor& input,
                        const Tensor& target, double delta, bool smooth_l1, int64_t reduction,
                        at::ScalarType out_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, target});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["delta"] = delta;
    ctx->saved_data["smooth_l1"] = smooth_l1;
    ctx->saved_data["reduction"] = reduction;
    return ew_forward(kind, input, target, delta, smooth_l1, reduction, out_dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(7);
    const Tensor& go = grad_outputs[0];
    // needs_input_grad counts tensor arguments only: 0 input, 1 target.
    const bool gi = ctx->needs_input_grad(0), gt = ctx->needs_input_grad(1);
    if (!go.defined() || !(gi || gt)) return grads;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &y = saved[1];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    // A full-shape grad_output for 'none', a 0-dim one (expanded: no copy) otherwise.
    const Tensor go4 = flat4(cast(go, x.scalar_type()).expand_symint(x.sym_sizes()));
    Tensor gx, gy;
    if (ctx->saved_data["kind"].toInt() == kBce) {
      static auto bwd = typed_op<EwBwd>("fusedloss::bce_bwd");
      std::tie(gx, gy) = bwd.call(go4, flat4(x), flat4(y), c10::nullopt, c10::nullopt,
                                  reduction, gi, gt);
    } else {
      static auto bwd = typed_op<HuberBwd>("fusedloss::huber_bwd");
      std::tie(gx, gy) = bwd.call(go4, flat4(x), flat4(y), c10::nullopt,
                                  ctx->saved_data["delta"].toDouble(),
                                  ctx->saved_data["smooth_l1"].toBool(), reduction, gi, gt);
    }
    if (gi) grads[1] = gx.view_symint(x.sym_sizes());
    if (gt) grads[2] = gy.view_symint(y.sym_sizes());
    return grads;
  }
};

Tensor elementwise_autograd(int64_t kind, const Tensor& input, const Tensor& target, double delta,
                            bool smooth_l1, int64_t reduction, at::ScalarType out_dtype) {
  return ElementwiseFn::apply(kind, input, target, delta, smooth_l1, reduction, out_dtype);
}

Tensor elementwise_plain(int64_t kind, const Tensor& input, const Tensor& target, double delta,
                         bool smooth_l1, int64_t reduction, at::ScalarType out_dtype) {
  return ew_forward(kind, input, target, delta, smooth_l1, reduction, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("elementwise_loss", &elementwise_autograd);
}

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy", &cross_entropy_plain);
  m.impl("elementwise_loss", &elementwise_plain);
}

}  // namespace fusedloss
