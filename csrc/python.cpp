// fusedloss._C as a Python module. Loading it runs the library's registrations (the op schemas in
// ops.cpp, each loss's kernels in its own file, the autograd in autograd.cpp); the module itself
// holds one function, the eager fast path of fusedloss.functional.cross_entropy.
//
// Why: a small batch's loss is per-call overhead, and calling torch.ops.fusedloss.cross_entropy
// from Python costs 2-3 us before the kernel starts (the overload's Python frame, the arguments
// parsed against the schema into a boxed stack, the boxed dispatch and the unboxing), where torch's
// own cross_entropy binding costs well under one. cross_entropy() below calls the op's Autograd
// kernel (csrc/autograd.cpp) itself, unboxed, which is where the dispatcher would send the call,
// and does so only where nothing else could have taken it on the way: CPU tensors of class
// torch.Tensor (or nn.Parameter) with the plain dispatch keys, the thread's dispatch key sets at
// their defaults (no autocast, inference mode, TorchDispatchMode, functorch transform or JIT
// tracer), no __torch_function__ mode and no RecordFunction callback (a profiler records the op).
// Anywhere else it returns None and the caller calls the op. torch.compile never reaches it: the
// caller skips it while compiling.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

namespace fusedloss {
namespace {

bool default_dispatch_state() {
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  return tls.included_ == c10::default_included_set &&
         tls.excluded_ == c10::default_excluded_set && !at::impl::torch_function_mode_enabled() &&
         !at::hasCallbacks();
}

// obj's tensor if it is a CPU torch.Tensor (or nn.Parameter) whose dispatch keys are a plain dense
// tensor's (not an inference tensor, a conjugate or negative view, or any other wrapper).
const at::Tensor* plain_cpu(PyObject* obj) {
  static const c10::DispatchKeySet plain({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                          c10::DispatchKey::AutogradCPU,
                                          c10::DispatchKey::AutocastCPU});
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.key_set() == plain ? &t : nullptr;
}

bool as_int(PyObject* obj, int64_t* v) {
  if (!PyLong_Check(obj)) return false;
  int overflow = 0;
  *v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return overflow == 0;
}

bool as_double(PyObject* obj, double* v) {
  if (PyFloat_CheckExact(obj)) {
    *v = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (!PyLong_Check(obj)) return false;
  *v = PyLong_AsDouble(obj);  // (an int too large for a double: OverflowError, cleared)
  if (*v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// The GIL released while the kernels run, as the dispatcher's Python binding does.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, z_loss): the loss
// as torch.ops.fusedloss.cross_entropy computes it for these arguments (int64 targets, the result
// in the input's dtype: autocast is off here), or None where the direct call does not apply or the
// op's checks reject the arguments (the caller's Python checks then raise the error that names
// the bad argument). A class index out of range raises IndexError, as the op does.
PyObject* cross_entropy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7 || !default_dispatch_state()) Py_RETURN_NONE;
  const at::Tensor* input = plain_cpu(args[0]);
  const at::Tensor* target = plain_cpu(args[1]);
  std::optional<at::Tensor> weight;
  if (args[2] != Py_None) {
    const at::Tensor* w = plain_cpu(args[2]);
    if (w == nullptr) Py_RETURN_NONE;
    weight = *w;
  }
  int64_t reduction = -1, ignore_index = 0;
  double label_smoothing = 0, z_loss = 0;
  const char* names[] = {"none", "mean", "sum"};
  for (int64_t r = 0; r < 3 && PyUnicode_Check(args[3]); ++r)
    if (PyUnicode_CompareWithASCIIString(args[3], names[r]) == 0) reduction = r;
  if (input == nullptr || target == nullptr || target->scalar_type() != at::kLong ||
      reduction < 0 || !as_int(args[4], &ignore_index) ||
      !as_double(args[5], &label_smoothing) || !as_double(args[6], &z_loss)) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         int64_t, int64_t, double, double, at::ScalarType);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedloss::cross_entropy", "").typed<Sig>();
  at::Tensor out;
  try {
    ReleaseGil no_gil;
    out = op.redispatch(c10::DispatchKeySet(c10::DispatchKey::AutogradCPU), *input, *target,
                        weight, reduction, ignore_index, label_smoothing, z_loss,
                        input->scalar_type());
  } catch (const c10::IndexError&) {
    throw;
  } catch (const c10::Error&) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"cross_entropy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(cross_entropy)),
     METH_FASTCALL,
     "The eager fast path of fusedloss.functional.cross_entropy (see csrc/python.cpp); None where "
     "it does not apply."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fusedloss

// `import fusedloss._C` loads this library, which runs the op registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                   fusedloss::methods};
  return PyModule_Create(&def);
}
