// The op schemas, declared once. Each loss registers its CPU kernel in its own file; the CUDA
// (Triton) kernels, fake tensors and autograd are registered from Python.
#include <Python.h>
#include <torch/library.h>

// `import fusedloss._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(fusedloss, m) {
  // logits viewed as [N, C, D] (D = prod of spatial dims, 1 for (N, C)); target [N*D] int64.
  // Returns the per-row loss and lse (fp32; fp64 for fp64 logits) and, if compute_grad, d(loss_row)/d(logits) * grad_scale.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? grad_scale, "
      "int ignore_index, float label_smoothing, float z_loss, bool compute_grad) "
      "-> (Tensor loss, Tensor lse, Tensor grad)");
  // Same, writing the gradient over the logits.
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, "
      "Tensor? grad_scale, int ignore_index, float label_smoothing, float z_loss) "
      "-> (Tensor loss, Tensor lse)");
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
}
