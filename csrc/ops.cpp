// The op schemas, declared once. Each loss registers its CPU kernel in its own file; the CUDA
// (Triton) kernels, fake tensors and autograd are registered from Python.
#include <torch/library.h>

// Loading the library (`import fusedloss._C`, csrc/python.cpp) runs the registrations below.

TORCH_LIBRARY(fusedloss, m) {
  // Frees the large buffer kept for reuse (common.h empty_reused); returns its size in bytes.
  m.def("release_buffers() -> int");
  // Cross-entropy: logits viewed as [N, C, D] (D = prod of spatial dims, 1 for (N, C)); target
  // [N*D] int64; weight [C] in the acc dtype (fp32; fp64 for fp64 logits).
  // Forward: the per-row loss and lse, in the acc dtype.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss) -> (Tensor loss, Tensor lse)");
  // Backward: d(loss_row)/d(logits) * grad_scale (acc dtype, a scalar or one per row), from the
  // forward's lse; into a new tensor, or over the logits.
  m.def(
      "cross_entropy_bwd(Tensor grad_scale, Tensor logits, Tensor target, Tensor lse, "
      "Tensor? weight, int ignore_index, float label_smoothing, float z_loss) -> Tensor");
  m.def(
      "cross_entropy_bwd_inplace(Tensor grad_scale, Tensor(a!) logits, Tensor target, Tensor lse, "
      "Tensor? weight, int ignore_index, float label_smoothing, float z_loss) -> ()");
  // Sigmoid focal loss, element-wise; input and target contiguous, one shape and dtype.
  // loss (acc dtype): per element, or if reduce per-chunk partial sums [ceil(numel / 4096)];
  // grad (if compute_grad): d(loss_elem)/d(input) * grad_scale. alpha < 0 disables alpha.
  m.def(
      "sigmoid_focal_fwd(Tensor input, Tensor target, Tensor? grad_scale, float alpha, "
      "float gamma, bool reduce, bool compute_grad) -> (Tensor loss, Tensor grad)");
  // Softmax focal loss: logits [N, C, D], target [N*D] int64, alpha per class (acc dtype).
  // Per-row loss and, if compute_grad, d(loss_row)/d(logits) * grad_scale.
  m.def(
      "softmax_focal_fwd(Tensor logits, Tensor target, Tensor? alpha, Tensor? grad_scale, "
      "int ignore_index, float gamma, bool compute_grad) -> (Tensor loss, Tensor grad)");
  // Element-wise losses over broadcast operands (csrc/elementwise.h): input and target are 4-d
  // views of one shape and dtype, any strides (0 along broadcast dims); weight / pos_weight the
  // same in the accumulation dtype. reduction 0/1/2 = none/mean/sum.
  // fwd: the loss, per element in the input dtype (contiguous) or the reduced 0-dim value in the
  // acc dtype. bwd: grad_out (a 4-d view in the input dtype, e.g. an expanded scalar) times
  // d(loss_elem)/d(input), d(loss_elem)/d(target), and 1/numel for mean (contiguous, or empty
  // when not asked for).
  m.def(
      "bce_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, int reduction) "
      "-> Tensor");
  m.def(
      "bce_bwd(Tensor grad_out, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction, bool grad_input, bool grad_target) -> (Tensor grad_input, Tensor grad_target)");
  // Huber (delta > 0) or, if smooth_l1, SmoothL1 with beta = delta >= 0 (0: L1).
  m.def(
      "huber_fwd(Tensor input, Tensor target, Tensor? weight, float delta, bool smooth_l1, "
      "int reduction) -> Tensor");
  m.def(
      "huber_bwd(Tensor grad_out, Tensor input, Tensor target, Tensor? weight, float delta, "
      "bool smooth_l1, int reduction, bool grad_input, bool grad_target) "
      "-> (Tensor grad_input, Tensor grad_target)");
  // Linear + cross-entropy (LM heads), blocked over rows so the logits never exist whole:
  // input [N, D], linear_weight [V, D], linear_bias [V] (input dtype), target [N] int64, weight
  // [V] acc dtype. loss: per row, acc dtype. If grad_scale (acc dtype, a scalar or one per row)
  // is given, also the gradients of sum_rows(grad_scale * loss_row) for the inputs flagged
  // need_*: grad_input [N, D], grad_weight [V, D], grad_bias [V]; empty tensors otherwise.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor linear_weight, Tensor? linear_bias, "
      "Tensor target, Tensor? weight, Tensor? grad_scale, int ignore_index, "
      "float label_smoothing, float z_loss, int block_rows, bool need_input, bool need_weight, "
      "bool need_bias) -> (Tensor loss, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Whole losses with their autograd in C++ (csrc/autograd.cpp): one op call per loss, for the
  // per-call overhead of small batches. reduction 0/1/2 = none/mean/sum; the result in out_dtype.
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float z_loss, ScalarType out_dtype) -> Tensor");
  // Softmax focal loss over class-index targets (shapes as cross_entropy; alpha per class).
  m.def(
      "softmax_focal(Tensor input, Tensor target, Tensor? alpha, float gamma, int ignore_index, "
      "int reduction, ScalarType out_dtype) -> Tensor");
  // kind 0: BCE-with-logits, 1: Huber (SmoothL1 if flag), 2: KL divergence (log_target if flag;
  // reduction 3: batchmean); input and target of one shape and dtype; weight (BCE, Huber) and
  // pos_weight (BCE) broadcast to it, needing no gradient.
  m.def(
      "elementwise_loss(int kind, Tensor input, Tensor target, Tensor? weight, "
      "Tensor? pos_weight, float delta, bool flag, int reduction, ScalarType out_dtype) "
      "-> Tensor");
  // Distillation from logits (fusedloss.functional.distillation_loss) in one call, with its
  // autograd in C++; reduction 0 none, 1 mean, 2 sum, 3 batchmean.
  m.def(
      "distillation(Tensor student, Tensor teacher, Tensor? target, float temperature, "
      "float beta, int ignore_index, float hard_weight, int reduction, ScalarType out_dtype) "
      "-> Tensor");
  // KL divergence (torch's kl_div), element-wise as bce / huber above: input log-probabilities,
  // target probabilities (log-probabilities if log_target); reduction 0/1/2 = none/mean/sum
  // ('batchmean' is sum / input.size(0), divided in Python).
  m.def("kl_div_fwd(Tensor input, Tensor target, bool log_target, int reduction) -> Tensor");
  m.def(
      "kl_div_bwd(Tensor grad_out, Tensor input, Tensor target, bool log_target, int reduction, "
      "bool grad_input, bool grad_target) -> (Tensor grad_input, Tensor grad_target)");
  // Distillation from logits: student and teacher [rows, V] (any strides, one dtype), target
  // None or [rows] int64. beta 0: KL(teacher || student), 1: KL(student || teacher), else the
  // generalised JSD; times temperature^2, plus hard_weight * cross-entropy(student, target).
  // Forward: per-row loss and statistics [rows, 5] (acc dtype). Backward: d(loss_row)/d(student)
  // * grad_scale (acc dtype, a scalar or one per row), into a new tensor or over the student.
  m.def(
      "distill_fwd(Tensor student, Tensor teacher, Tensor? target, float temperature, "
      "float beta, int ignore_index, float hard_weight) -> (Tensor loss, Tensor stats)");
  m.def(
      "distill_bwd(Tensor grad_scale, Tensor student, Tensor teacher, Tensor? target, "
      "Tensor stats, float temperature, float beta, int ignore_index, float hard_weight) "
      "-> Tensor");
  m.def(
      "distill_bwd_inplace(Tensor grad_scale, Tensor(a!) student, Tensor teacher, "
      "Tensor? target, Tensor stats, float temperature, float beta, int ignore_index, "
      "float hard_weight) -> ()");
}
