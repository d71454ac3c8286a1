// Whole-loss ops with their autograd in C++: fusedloss::cross_entropy,
// fusedloss::elementwise_loss (BCE-with-logits, Huber / SmoothL1, KL divergence),
// fusedloss::distillation and fusedloss::softmax_focal.
//
// Why: on a small batch (32 x 10) the time of a loss is per-call overhead, not memory traffic. A
// Python autograd.Function, its ctx and a dozen small tensor ops from Python cost 2-3x what torch's
// own cross_entropy costs in all. Here one op call from Python runs the forward kernel, the
// reduction and the autograd bookkeeping in C++, and backward runs without entering Python. In
// plain eager calls on CPU tensors the functionals reach these Autograd kernels without the
// dispatcher's boxed call from Python (csrc/python.cpp).
// The kernels are the same ops as the Python path's (called through the dispatcher, so CUDA
// tensors reach the Triton kernels registered for "cuda"); the Python path stays for what these
// ops do not cover (probability targets, inplace_backward, input and target of different shapes or
// dtypes, other backends).
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ExpandUtils.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "elementwise.h"

namespace fusedloss {
namespace {

using at::Tensor;
using c10::optional;
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

// Real CPU memory: not a meta, fake (Python) or functional tensor, whose values cannot be read.
bool plain_cpu(const Tensor& t) {
  return t.device().is_cpu() &&
         !t.key_set().has_any(
             c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// The mean's denominator of a per-row loss: the sum of w[target] (the count without w; every row
// when t is undefined) over non-ignored rows, times `factor`; a number on plain CPU tensors (one
// loop, accumulated in fp64: a small batch's time is per-call overhead), else a device tensor (no
// host sync). host: plain CPU tensors; opts: the rows' device and acc dtype. t: [rows] int64 or
// undefined; w: [C] acc dtype.
struct Denominator {
  Tensor dev;
  double host = 0;  // 0: none (a device denominator, or none needed)
};

Denominator denominator(bool host, const at::TensorOptions& opts, int64_t rows, const Tensor& t,
                        const optional<Tensor>& w, int64_t ignore_index, int64_t C,
                        double factor) {
  Denominator d;
  if (host) {
    double den = t.defined() ? 0 : static_cast<double>(rows);
    if (t.defined()) {
      AT_DISPATCH_FLOATING_TYPES(c10::typeMetaToScalarType(opts.dtype()), "denominator", [&] {
        const int64_t* tp = t.const_data_ptr<int64_t>();
        const scalar_t* wp = w.has_value() ? w->const_data_ptr<scalar_t>() : nullptr;
        for (int64_t i = 0; i < rows; ++i) {
          if (tp[i] == ignore_index) continue;
          den += wp ? static_cast<double>(wp[std::clamp<int64_t>(tp[i], 0, C - 1)]) : 1.0;
        }
      });
    }
    d.host = den * factor;
  } else if (!t.defined()) {
    d.dev = at::scalar_tensor(static_cast<double>(rows) * factor, opts);
  } else {
    const Tensor valid = t.ne(ignore_index);
    if (w.has_value()) {
      const Tensor wy = w->index_select(0, t.clamp(0, C - 1));
      d.dev = at::where(valid, wy, 0.0).sum();
    } else {
      d.dev = valid.sum(c10::typeMetaToScalarType(opts.dtype()));
    }
    if (factor != 1) d.dev = d.dev.mul(factor);
  }
  return d;
}

// A new CPU tensor of the given sizes and floating dtype holding v, written without an op call.
Tensor number_tensor(double v, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor out = at::empty(sizes, opts);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "number_tensor", [&] {
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(v);
  });
  return out;
}

// A per-row loss reduced (cross-entropy, distillation, softmax focal): out, and for the mean its
// denominator (above), which backward divides by.
struct RowReduction {
  Tensor out;
  Denominator denom;
};

// reduction: 0 none (out = loss), 1 mean (over d), 2 sum.
RowReduction reduce_rows(const Tensor& loss, int64_t reduction, Denominator d) {
  RowReduction r;
  if (reduction == 0) {
    r.out = loss;
    return r;
  }
  if (reduction == 1) r.denom = std::move(d);
  if (plain_cpu(loss)) {
    // One loop over the rows instead of small tensor ops, accumulated in fp64.
    double sum = 0;
    AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), "reduce_rows", [&] {
      const scalar_t* l = loss.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < loss.numel(); ++i) sum += static_cast<double>(l[i]);
    });
    if (reduction == 1) sum /= r.denom.host;  // 0 / 0 = NaN for an all-ignored batch, as torch
    r.out = number_tensor(sum, {}, loss.options());
  } else {
    r.out = reduction == 2 ? loss.sum() : loss.sum().div(r.denom.dev);
  }
  return r;
}

// The same, finding the mean's denominator first. t: [rows] int64 or undefined; w: [C] acc dtype.
RowReduction reduce_rows(const Tensor& loss, const Tensor& t, const optional<Tensor>& w,
                         int64_t ignore_index, int64_t C, int64_t reduction, double factor) {
  Denominator d;
  if (reduction == 1)
    d = denominator(plain_cpu(loss), loss.options(), loss.numel(), t, w, ignore_index, C, factor);
  return reduce_rows(loss, reduction, std::move(d));
}

// Backward's per-row (or scalar) grad_scale: grad_output over the mean's denominator, in acc.
Tensor grad_scale(const Tensor& go, const RowReduction& r, at::ScalarType acc) {
  if (plain_cpu(go) && go.numel() == 1) {  // a number on the CPU: read it, no tensor ops
    double g = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "go", [&] {
      g = static_cast<double>(*go.const_data_ptr<scalar_t>());
    });
    return number_tensor(r.denom.host != 0 ? g / r.denom.host : g, {1}, go.options().dtype(acc));
  }
  Tensor scale = cast(go.reshape(-1), acc);
  if (r.denom.dev.defined()) scale = scale.div(r.denom.dev);
  if (r.denom.host != 0) scale = scale.div(r.denom.host);
  return dense(scale);
}

struct CEForward {
  Tensor t, lse;
  optional<Tensor> w;
  RowReduction red;
};

// reduction: 0 none, 1 mean, 2 sum.
CEForward ce_forward(const Tensor& input, const Tensor& target, const optional<Tensor>& weight,
                     int64_t reduction, int64_t ignore_index, double label_smoothing,
                     double z_loss, at::ScalarType out_dtype) {
  const Tensor x3 = rows3d(input);
  const auto acc = acc_of(input);
  CEForward f;
  f.t = dense(cast(target.dim() == 1 ? target : target.reshape(-1), at::kLong));  // (no view op)
  if (weight.has_value() && weight->defined()) f.w = dense(cast(*weight, acc));
  Tensor loss;
  static auto fwd = typed_op<CeFwd>("fusedloss::cross_entropy_fwd");
  std::tie(loss, f.lse) = fwd.call(x3, f.t, f.w, ignore_index, label_smoothing, z_loss);
  f.red = reduce_rows(loss, f.t, f.w, ignore_index, x3.size(1), reduction, 1.0);
  if (reduction == 0) f.red.out = f.red.out.view_symint(target.sym_sizes());
  f.red.out = cast(f.red.out, out_dtype);
  return f;
}

// The checks the Python functional makes, for the op's own callers and for its fast path (which
// calls this op first and, if it raises, takes the full Python path for torch's error message):
// logits, class-index targets and per-class weights (cross-entropy's weight, focal's alpha).
void check_class_rows(const char* op, const Tensor& input, const Tensor& target,
                      const optional<Tensor>& weight, int64_t reduction) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()) && input.dim() >= 1, op,
              ": input must be a floating tensor (C,), (N, C) or (N, C, ...)");
  const int64_t C = input.dim() == 1 ? input.size(0) : input.size(1);
  TORCH_CHECK(C >= 1, op, ": input has no class");
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
              ": target must hold int64 (or uint8) class indices");
  bool shape_ok = target.dim() == std::max<int64_t>(input.dim() - 1, 0);
  for (int64_t i = 0; shape_ok && i < target.dim(); ++i)
    shape_ok = target.size(i) == input.size(i == 0 ? 0 : i + 1);
  TORCH_CHECK(shape_ok, op, ": target must have the input's shape without C");
  TORCH_CHECK(target.device() == input.device(), op, ": target's device");
  if (weight.has_value() && weight->defined())
    TORCH_CHECK(at::isFloatingType(weight->scalar_type()) && weight->dim() == 1 &&
                    weight->size(0) == C && weight->device() == input.device(),
                op, ": the class weights must be a floating (C,) vector on input's device");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction out of range");
}

void check_ce(const Tensor& input, const Tensor& target, const optional<Tensor>& weight,
              int64_t reduction, double label_smoothing, double z_loss) {
  check_class_rows("fusedloss::cross_entropy", input, target, weight, reduction);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1 && z_loss >= 0,
              "fusedloss::cross_entropy: label_smoothing or z_loss out of range");
}

// In a backward Node's apply: the backward ops skip the autograd and ADInplaceOrView layers (their
// fallbacks check every input and wrap every output of each call: 4-6 us of a 32x10
// cross-entropy's backward) unless create_graph asked for a graph, where they keep torch's
// handling of an op without a derivative (a warning if the second derivative is taken).
struct BelowAutogradUnlessGraph {
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  BelowAutogradUnlessGraph() {
    if (!at::GradMode::is_enabled()) guard.emplace();
  }
};

// Backward of fusedloss::cross_entropy, written as an autograd Node (rather than a
// torch::autograd::Function, whose string-keyed saved_data and generic output wrapping cost
// more than a small batch's whole loss).
struct CrossEntropyBackward : torch::autograd::Node {
  torch::autograd::SavedVariable input;
  CEForward f;
  int64_t ignore_index = 0;
  double label_smoothing = 0, z_loss = 0;

  std::string name() const override { return "fusedloss::CrossEntropyBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input.reset_data();
    f = CEForward();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list grads(2);  // input, weight (which gets none, as in torch)
    const Tensor& go = grad_outputs[0];
    if (!go.defined() || !task_should_compute_output(0)) return grads;
    const Tensor x = input.unpack();  // (raises after release_variables, or if x was modified)
    const BelowAutogradUnlessGraph below;
    const Tensor scale = grad_scale(go, f.red, f.lse.scalar_type());
    static auto bwd = typed_op<CeBwd>("fusedloss::cross_entropy_bwd");
    const Tensor grad = bwd.call(scale, rows3d(x), f.t, f.lse, f.w, ignore_index,
                                 label_smoothing, z_loss);
    grads[0] = grad.view_symint(x.sym_sizes());
    return grads;
  }
};

Tensor cross_entropy_autograd(const Tensor& input, const Tensor& target,
                              const optional<Tensor>& weight, int64_t reduction,
                              int64_t ignore_index, double label_smoothing, double z_loss,
                              at::ScalarType out_dtype) {
  check_ce(input, target, weight, reduction, label_smoothing, z_loss);
  CEForward f;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    f = ce_forward(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                   out_dtype);
  }
  Tensor out = f.red.out;
  if (torch::autograd::compute_requires_grad(input, weight)) {
    auto node = c10::make_intrusive<CrossEntropyBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight));
    node->input = torch::autograd::SavedVariable(input, false);
    node->ignore_index = ignore_index;
    node->label_smoothing = label_smoothing;
    node->z_loss = z_loss;
    f.red.out = Tensor();
    node->f = std::move(f);
    torch::autograd::set_history(out, node);
  }
  return out;
}

// Below autograd (inference mode, tracing): the forward alone.
Tensor cross_entropy_plain(const Tensor& input, const Tensor& target,
                           const optional<Tensor>& weight, int64_t reduction,
                           int64_t ignore_index, double label_smoothing, double z_loss,
                           at::ScalarType out_dtype) {
  check_ce(input, target, weight, reduction, label_smoothing, z_loss);
  return ce_forward(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                    out_dtype)
      .red.out;
}

// ---- distillation from logits ------------------------------------------------------------------

using DistillFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                              double, double, int64_t, double);
using DistillBwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                          const Tensor&, double, double, int64_t, double);

struct DistillOptions {
  double temperature = 1, beta = 0, hard_weight = 0;
  int64_t ignore_index = -100;
};

// reduction: 0 none, 1 mean (over non-ignored rows * V), 2 sum, 3 batchmean (over rows).
void check_distill(const Tensor& student, const Tensor& teacher, const optional<Tensor>& target,
                   const DistillOptions& o, int64_t reduction) {
  TORCH_CHECK(at::isFloatingType(student.scalar_type()) && student.dim() >= 1 &&
                  student.size(-1) >= 1 && at::isFloatingType(teacher.scalar_type()) &&
                  teacher.sizes() == student.sizes() && teacher.device() == student.device() &&
                  !teacher.requires_grad(),
              "fusedloss::distillation: student and teacher must be floating [..., V] logits of "
              "one shape and device, the teacher needing no gradient");
  TORCH_CHECK(o.temperature > 0 && std::isfinite(o.temperature) && o.beta >= 0 && o.beta <= 1 &&
                  o.hard_weight >= 0 && std::isfinite(o.hard_weight) && reduction >= 0 &&
                  reduction <= 3,
              "fusedloss::distillation: temperature, beta, hard_weight or reduction out of range");
  if (target.has_value() && target->defined()) {
    const Tensor& t = *target;
    TORCH_CHECK((t.scalar_type() == at::kLong || t.scalar_type() == at::kByte) &&
                    t.sizes() == student.sizes().slice(0, student.dim() - 1) &&
                    t.device() == student.device(),
                "fusedloss::distillation: target must hold int64 (or uint8) class indices of the "
                "logits' shape without V");
  } else {
    TORCH_CHECK(o.hard_weight == 0, "fusedloss::distillation: hard_weight > 0 needs a target");
  }
}

struct DistillForward {
  Tensor teacher2, t, stats;  // the teacher [rows, V] in the student's dtype; targets [rows]
  RowReduction red;
};

DistillForward distill_forward(const Tensor& student, const Tensor& teacher,
                               const optional<Tensor>& target, const DistillOptions& o,
                               int64_t reduction, at::ScalarType out_dtype) {
  const int64_t V = student.size(-1);
  DistillForward f;
  f.teacher2 = cast(teacher, student.scalar_type()).reshape({-1, V});
  if (target.has_value() && target->defined()) f.t = dense(cast(target->reshape(-1), at::kLong));
  Tensor loss;
  static auto fwd = typed_op<DistillFwd>("fusedloss::distill_fwd");
  std::tie(loss, f.stats) =
      fwd.call(student.reshape({-1, V}), f.teacher2, f.t.defined() ? optional<Tensor>(f.t) : c10::nullopt,
               o.temperature, o.beta, o.ignore_index, o.hard_weight);
  // mean and batchmean are means over the non-ignored rows, mean's also over V.
  f.red = reduce_rows(loss, f.t, c10::nullopt, o.ignore_index, V, reduction == 3 ? 1 : reduction,
                      reduction == 1 ? static_cast<double>(V) : 1.0);
  if (reduction == 0) f.red.out = f.red.out.view_symint(student.sym_sizes().slice(0, student.dim() - 1));
  f.red.out = cast(f.red.out, out_dtype);
  return f;
}

// Backward of fusedloss::distillation as an autograd Node (see CrossEntropyBackward).
struct DistillationBackward : torch::autograd::Node {
  torch::autograd::SavedVariable student;
  DistillForward f;
  DistillOptions o;

  std::string name() const override { return "fusedloss::DistillationBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    student.reset_data();
    f = DistillForward();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list grads(1);
    const Tensor& go = grad_outputs[0];
    if (!go.defined() || !task_should_compute_output(0)) return grads;
    const Tensor x = student.unpack();  // (raises after release_variables, or if x was modified)
    const BelowAutogradUnlessGraph below;
    static auto bwd = typed_op<DistillBwd>("fusedloss::distill_bwd");
    const Tensor grad = bwd.call(grad_scale(go, f.red, f.stats.scalar_type()),
                                 x.reshape({-1, x.size(-1)}), f.teacher2,
                                 f.t.defined() ? optional<Tensor>(f.t) : c10::nullopt, f.stats,
                                 o.temperature, o.beta, o.ignore_index, o.hard_weight);
    grads[0] = grad.view_symint(x.sym_sizes());
    return grads;
  }
};

Tensor distillation_autograd(const Tensor& student, const Tensor& teacher,
                             const optional<Tensor>& target, double temperature, double beta,
                             int64_t ignore_index, double hard_weight, int64_t reduction,
                             at::ScalarType out_dtype) {
  const DistillOptions o{temperature, beta, hard_weight, ignore_index};
  check_distill(student, teacher, target, o, reduction);
  DistillForward f;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    f = distill_forward(student, teacher, target, o, reduction, out_dtype);
  }
  Tensor out = f.red.out;
  if (torch::autograd::compute_requires_grad(student)) {
    auto node = c10::make_intrusive<DistillationBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(student));
    node->student = torch::autograd::SavedVariable(student, false);
    node->o = o;
    f.red.out = Tensor();
    node->f = std::move(f);
    torch::autograd::set_history(out, node);
  }
  return out;
}

Tensor distillation_plain(const Tensor& student, const Tensor& teacher,
                          const optional<Tensor>& target, double temperature, double beta,
                          int64_t ignore_index, double hard_weight, int64_t reduction,
                          at::ScalarType out_dtype) {
  const DistillOptions o{temperature, beta, hard_weight, ignore_index};
  check_distill(student, teacher, target, o, reduction);
  return distill_forward(student, teacher, target, o, reduction, out_dtype).red.out;
}

// ---- element-wise losses: input and target of one shape and dtype ------------------------------

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

using KlFwd = Tensor(const Tensor&, const Tensor&, bool, int64_t);
using KlBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool, int64_t,
                                         bool, bool);

// kind: 0 BCE-with-logits, 1 Huber / SmoothL1 (flag: SmoothL1), 2 KL divergence (flag:
// log_target). reduction: 0 none, 1 mean, 2 sum, 3 batchmean (KL: sum / input.size(0)).
constexpr int64_t kBce = 0, kHuber = 1, kKl = 2, kBatchmean = 3;

// The kernels' reduction (batchmean sums) and the factor the result takes after it.
int64_t kernel_reduction(int64_t reduction) { return reduction == kBatchmean ? 2 : reduction; }
double batchmean_factor(const Tensor& x, int64_t reduction) {
  return reduction == kBatchmean && x.dim() > 0 ? 1.0 / static_cast<double>(x.size(0)) : 1.0;
}

// The operands of one call: input and target, and weight / pos_weight (None, or broadcast to the
// input's shape: stride 0, no copy) in the acc dtype; as the 4-d views of one shape the kernels
// take: contiguous operands as one run, others (up to 4 dims) with their own strides and leading
// dims of 1; more dims are copied to contiguous first.
struct EwOperands {
  Tensor x, y;
  optional<Tensor> w, pw;
  bool flat = true;

  EwOperands(const Tensor& input, const Tensor& target, const optional<Tensor>& weight,
             const optional<Tensor>& pos_weight)
      : x(input), y(target) {
    const auto acc = acc_of(input);
    if (weight.has_value() && weight->defined())
      w = cast(*weight, acc).expand_symint(input.sym_sizes());
    if (pos_weight.has_value() && pos_weight->defined())
      pw = cast(*pos_weight, acc).expand_symint(input.sym_sizes());
    flat = input.dim() > 4 || (input.is_contiguous() && target.is_contiguous() &&
                               (!w || w->is_contiguous()) && (!pw || pw->is_contiguous()));
  }
  Tensor view4(const Tensor& t) const {
    if (flat) return t.reshape_symint({1, 1, 1, t.sym_numel()});  // (a view, or a copy)
    Tensor v = t;
    while (v.dim() < 4) v = v.unsqueeze(0);
    return v;
  }
  optional<Tensor> view4(const optional<Tensor>& t) const {
    return t ? optional<Tensor>(view4(*t)) : c10::nullopt;
  }
};

void check_ew(int64_t kind, const Tensor& input, const Tensor& target,
              const optional<Tensor>& weight, const optional<Tensor>& pos_weight, double delta,
              bool flag, int64_t reduction, at::ScalarType out_dtype) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()) &&
                  target.scalar_type() == input.scalar_type() &&
                  input.sizes() == target.sizes() && input.device() == target.device(),
              "fusedloss::elementwise_loss: input and target must be floating tensors of one "
              "shape, dtype and device");
  TORCH_CHECK(kind >= kBce && kind <= kKl && reduction >= 0 &&
                  reduction <= (kind == kKl ? kBatchmean : 2),
              "fusedloss::elementwise_loss: kind or reduction out of range");
  TORCH_CHECK(kind != kHuber || (flag ? delta >= 0 : delta > 0),
              "fusedloss::elementwise_loss: delta (beta) out of range");
  TORCH_CHECK(reduction != 0 || out_dtype == input.scalar_type(),
              "fusedloss::elementwise_loss: reduction 'none' returns the input's dtype");
  for (const optional<Tensor>* t : {&weight, &pos_weight}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    const Tensor& u = **t;
    // Huber's weight has the input's shape (as torch's), and its result dtype would follow a
    // weight of another dtype: that case takes Python's path.
    TORCH_CHECK(at::isFloatingType(u.scalar_type()) && u.device() == input.device() &&
                    !u.requires_grad() && at::is_expandable_to(u.sizes(), input.sizes()) &&
                    (kind == kBce || (kind == kHuber && t == &weight &&
                                      u.sizes() == input.sizes() &&
                                      u.scalar_type() == input.scalar_type())),
                "fusedloss::elementwise_loss: weight (BCE, Huber) and pos_weight (BCE) must be "
                "floating "
                "tensors on the input's device that broadcast to its shape (Huber: of its shape "
                "and dtype) and need no gradient");
  }
}

Tensor ew_forward(int64_t kind, const EwOperands& o, double delta, bool flag,
                  int64_t reduction, at::ScalarType out_dtype) {
  Tensor loss;
  const int64_t r = kernel_reduction(reduction);
  if (kind == kBce) {
    static auto fwd = typed_op<EwFwd>("fusedloss::bce_fwd");
    loss = fwd.call(o.view4(o.x), o.view4(o.y), o.view4(o.w), o.view4(o.pw), r);
  } else if (kind == kHuber) {
    static auto fwd = typed_op<HuberFwd>("fusedloss::huber_fwd");
    loss = fwd.call(o.view4(o.x), o.view4(o.y), o.view4(o.w), delta, flag, r);
  } else {
    static auto fwd = typed_op<KlFwd>("fusedloss::kl_div_fwd");
    loss = fwd.call(o.view4(o.x), o.view4(o.y), flag, r);
  }
  if (reduction == kBatchmean) loss = loss.mul(batchmean_factor(o.x, reduction));
  return cast(reduction == 0 ? loss.view_symint(o.x.sym_sizes()) : loss, out_dtype);
}

// The forward of a reduced loss whose input needs a gradient, on real CPU tensors: the loss and
// the input's gradient for grad_output 1 in one pass (elementwise.h *_fwd_grad). Backward then
// only hands the gradient over: the inputs are read once per step instead of twice (Huber 2^22
// fp32 fwd+bwd: Inductor saves x - y in its forward and reads it back; this reads nothing back).
std::tuple<Tensor, Tensor> ew_forward_grad(int64_t kind, const EwOperands& o, double delta,
                                           bool flag, int64_t reduction, at::ScalarType out_dtype) {
  Tensor loss, grad;
  const int64_t r = kernel_reduction(reduction);
  const double f = batchmean_factor(o.x, reduction);
  if (kind == kBce) {
    std::tie(loss, grad) = bce_fwd_grad(o.view4(o.x), o.view4(o.y), o.view4(o.w), o.view4(o.pw),
                                        r, f);
  } else if (kind == kHuber) {
    std::tie(loss, grad) = huber_fwd_grad(o.view4(o.x), o.view4(o.y), o.view4(o.w), delta, flag,
                                          r, f);
  } else {
    std::tie(loss, grad) = kl_div_fwd_grad(o.view4(o.x), o.view4(o.y), flag, r, f);
  }
  if (reduction == kBatchmean) loss = loss.mul(f);
  return {cast(loss, out_dtype), grad.view(o.x.sizes())};
}

// Backward of fusedloss::elementwise_loss as an autograd Node (see CrossEntropyBackward).
struct ElementwiseBackward : torch::autograd::Node {
  torch::autograd::SavedVariable input, target;
  optional<Tensor> weight, pos_weight;  // in the acc dtype, not broadcast; need no gradient
  Tensor input_grad;  // from ew_forward_grad (or undefined): the first backward takes it
  int64_t kind = 0, reduction = 0;
  double delta = 0;
  bool flag = false;

  std::string name() const override { return "fusedloss::ElementwiseLossBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input.reset_data();
    target.reset_data();
    weight.reset();
    pos_weight.reset();
    input_grad.reset();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list grads(2);
    const Tensor& go = grad_outputs[0];
    const bool gi = task_should_compute_output(0), gt = task_should_compute_output(1);
    if (!go.defined() || !(gi || gt)) return grads;
    if (input_grad.defined() && gi && !gt) {
      // Moved out, so that AccumulateGrad can keep it as .grad without a copy; a second
      // backward (retain_graph) recomputes below, and so does a grad_output other than 1
      // (scaling the stored gradient would round twice: a loss scale on fp16 would lose the
      // small gradients' digits). (A CPU scalar: the comparison is a plain read.)
      Tensor g = std::move(input_grad);
      input_grad = Tensor();
      if (go.numel() == 1 && go.item<double>() == 1.0) {
        input.unpack();  // (raises, as below, if the input was modified in place since forward)
        grads[0] = std::move(g);
        return grads;
      }
    }
    const EwOperands o(input.unpack(), target.unpack(), weight, pos_weight);
    const BelowAutogradUnlessGraph below;
    // A full-shape grad_output for 'none', a 0-dim one (expanded: no copy) otherwise.
    Tensor g = cast(go, o.x.scalar_type());
    if (reduction == kBatchmean) g = g.mul(batchmean_factor(o.x, reduction));
    const Tensor go4 = o.view4(g.expand_symint(o.x.sym_sizes()));
    const int64_t r = kernel_reduction(reduction);
    Tensor gx, gy;
    if (kind == kBce) {
      static auto bwd = typed_op<EwBwd>("fusedloss::bce_bwd");
      std::tie(gx, gy) = bwd.call(go4, o.view4(o.x), o.view4(o.y), o.view4(o.w),
                                  o.view4(o.pw), r, gi, gt);
    } else if (kind == kHuber) {
      static auto bwd = typed_op<HuberBwd>("fusedloss::huber_bwd");
      std::tie(gx, gy) = bwd.call(go4, o.view4(o.x), o.view4(o.y), o.view4(o.w), delta,
                                  flag, r, gi, gt);
    } else {
      static auto bwd = typed_op<KlBwd>("fusedloss::kl_div_bwd");
      std::tie(gx, gy) = bwd.call(go4, o.view4(o.x), o.view4(o.y), flag, r, gi, gt);
    }
    if (gi) grads[0] = gx.view_symint(o.x.sym_sizes());
    if (gt) grads[1] = gy.view_symint(o.y.sym_sizes());
    return grads;
  }
};

Tensor elementwise_autograd(int64_t kind, const Tensor& input, const Tensor& target,
                            const optional<Tensor>& weight, const optional<Tensor>& pos_weight,
                            double delta, bool flag, int64_t reduction,
                            at::ScalarType out_dtype) {
  check_ew(kind, input, target, weight, pos_weight, delta, flag, reduction, out_dtype);
  const bool needs_grad = torch::autograd::compute_requires_grad(input, target);
  // One pass for loss and gradient: real CPU tensors (not fake or functional ones, as under
  // torch.compile's tracing), a reduced loss, and the gradient wanted for the input only.
  // Not for fp16, trained with a loss scale: its grad_output is not 1, so backward recomputes.
  const bool one_pass = needs_grad && input.requires_grad() && !target.requires_grad() &&
                        reduction != 0 && input.is_cpu() && input.scalar_type() != at::kHalf &&
                        !at::areAnyTensorSubclassLike({input, target}) &&
                        !at::areAnyOptionalTensorSubclassLike({weight, pos_weight});
  Tensor out, input_grad;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    const EwOperands o(input, target, weight, pos_weight);
    if (one_pass) {
      std::tie(out, input_grad) = ew_forward_grad(kind, o, delta, flag, reduction, out_dtype);
    } else {
      out = ew_forward(kind, o, delta, flag, reduction, out_dtype);
    }
  }
  if (needs_grad) {
    auto node = c10::make_intrusive<ElementwiseBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, target));
    node->input = torch::autograd::SavedVariable(input, false);
    node->target = torch::autograd::SavedVariable(target, false);
    node->weight = weight;
    node->pos_weight = pos_weight;
    node->input_grad = std::move(input_grad);
    node->kind = kind;
    node->reduction = reduction;
    node->delta = delta;
    node->flag = flag;
    torch::autograd::set_history(out, node);
  }
  return out;
}

Tensor elementwise_plain(int64_t kind, const Tensor& input, const Tensor& target,
                         const optional<Tensor>& weight, const optional<Tensor>& pos_weight,
                         double delta, bool flag, int64_t reduction,
                         at::ScalarType out_dtype) {
  check_ew(kind, input, target, weight, pos_weight, delta, flag, reduction, out_dtype);
  return ew_forward(kind, EwOperands(input, target, weight, pos_weight), delta, flag,
                    reduction, out_dtype);
}

// ---- softmax focal loss over class-index targets ----------------------------------------------

using FocalFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                            const optional<Tensor>&, int64_t, double, bool);

void check_focal(const Tensor& input, const Tensor& target, const optional<Tensor>& alpha,
                 double gamma, int64_t reduction) {
  check_class_rows("fusedloss::softmax_focal", input, target, alpha, reduction);
  TORCH_CHECK(gamma >= 0 && std::isfinite(gamma),
              "fusedloss::softmax_focal: gamma must be finite and >= 0");
}

struct FocalForward {
  Tensor out, grad;  // grad (if asked for): d(reduced loss)/d(input), the input's shape
};

// One kernel pass for the loss and, if compute_grad, the gradient for grad_output = 1, scaled for
// the reduction (mean: by 1 / the denominator, which is therefore found first).
FocalForward focal_forward(const Tensor& input, const Tensor& target, const optional<Tensor>& alpha,
                           double gamma, int64_t ignore_index, int64_t reduction,
                           at::ScalarType out_dtype, bool compute_grad) {
  const Tensor x3 = rows3d(input);
  const auto acc = acc_of(input);
  const int64_t C = x3.size(1);
  const Tensor t = dense(cast(target.dim() == 1 ? target : target.reshape(-1), at::kLong));
  optional<Tensor> a;
  if (alpha.has_value() && alpha->defined()) a = dense(cast(*alpha, acc));
  // The mean's denominator, found once: the gradient's scale and the loss's divisor.
  Denominator d;
  optional<Tensor> scale;
  if (reduction == 1) {
    const bool host = plain_cpu(x3);  // (as reduce_rows decides from the loss, x3's rows)
    d = denominator(host, x3.options().dtype(acc), t.numel(), t, a, ignore_index, C, 1.0);
    if (compute_grad)  // (inf if every row is ignored)
      scale = host ? number_tensor(1.0 / d.host, {1}, x3.options().dtype(acc))
                   : d.dev.reciprocal().reshape({1});
  }
  static auto fwd = typed_op<FocalFwd>("fusedloss::softmax_focal_fwd");
  auto [loss, grad] = fwd.call(x3, t, a, scale, ignore_index, gamma, compute_grad);
  FocalForward f;
  f.out = reduce_rows(loss, reduction, std::move(d)).out;
  if (reduction == 0) f.out = f.out.view_symint(target.sym_sizes());
  f.out = cast(f.out, out_dtype);
  if (compute_grad) f.grad = grad.view_symint(input.sym_sizes());
  return f;
}

// Backward of fusedloss::softmax_focal: the gradient from forward's pass times grad_output. A CPU
// grad_output of 1 hands it over as it is: unless the graph is retained, the engine drops this
// node's reference before AccumulateGrad runs, which then keeps it as .grad without a copy.
struct SoftmaxFocalBackward : torch::autograd::Node {
  Tensor grad;
  int64_t reduction = 0;

  std::string name() const override { return "fusedloss::SoftmaxFocalBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    grad.reset();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list grads(2);  // input, alpha (which gets none, as the Python Function's)
    const Tensor& go = grad_outputs[0];
    if (!go.defined() || !task_should_compute_output(0)) return grads;
    TORCH_CHECK(grad.defined(), torch::autograd::ERR_BACKWARD_TWICE);
    if (reduction == 0) {  // one factor per row, broadcast over the classes
      const Tensor g3 = rows3d(grad);
      grads[0] = g3.mul(go.reshape({g3.size(0), 1, g3.size(2)})).view_symint(grad.sym_sizes());
    } else if (!at::GradMode::is_enabled() && plain_cpu(go) && go.numel() == 1 &&
               go.item<double>() == 1.0) {
      grads[0] = grad;
    } else {
      grads[0] = grad.mul(go);
    }
    if (at::GradMode::is_enabled() && go.requires_grad()) {
      // create_graph: differentiating this gradient again raises, as once_differentiable makes
      // the Python Function's.
      grads[0] = torch::autograd::DelayedError(
                     "fusedloss::softmax_focal: the gradient is not differentiable again", 1)
                     .apply({grads[0]})[0];
    }
    return grads;
  }
};

Tensor softmax_focal_autograd(const Tensor& input, const Tensor& target,
                              const optional<Tensor>& alpha, double gamma, int64_t ignore_index,
                              int64_t reduction, at::ScalarType out_dtype) {
  check_focal(input, target, alpha, gamma, reduction);
  const bool needs_grad = torch::autograd::compute_requires_grad(input, alpha);
  FocalForward f;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    f = focal_forward(input, target, alpha, gamma, ignore_index, reduction, out_dtype,
                      needs_grad && input.requires_grad());
  }
  if (needs_grad) {
    auto node = c10::make_intrusive<SoftmaxFocalBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, alpha));
    node->grad = std::move(f.grad);
    node->reduction = reduction;
    torch::autograd::set_history(f.out, node);
  }
  return f.out;
}

Tensor softmax_focal_plain(const Tensor& input, const Tensor& target,
                           const optional<Tensor>& alpha, double gamma, int64_t ignore_index,
                           int64_t reduction, at::ScalarType out_dtype) {
  check_focal(input, target, alpha, gamma, reduction);
  return focal_forward(input, target, alpha, gamma, ignore_index, reduction, out_dtype, false).out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("elementwise_loss", &elementwise_autograd);
  m.impl("distillation", &distillation_autograd);
  m.impl("softmax_focal", &softmax_focal_autograd);
}

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy", &cross_entropy_plain);
  m.impl("elementwise_loss", &elementwise_plain);
  m.impl("distillation", &distillation_plain);
  m.impl("softmax_focal", &softmax_focal_plain);
}

}  // namespace fusedloss
