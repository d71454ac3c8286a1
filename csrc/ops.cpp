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
}
