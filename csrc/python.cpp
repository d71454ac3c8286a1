// fusedloss._C as a Python module. Loading it runs the library's registrations (the op schemas in
// ops.cpp, each loss's kernels in its own file, the autograd in autograd.cpp); the module itself
// holds the eager fast paths of the whole-loss ops (cross-entropy, the element-wise losses,
// distillation and softmax focal).
//
// Why: a small batch's loss is per-call overhead, and calling torch.ops.fusedloss.cross_entropy
// (or another op) from Python costs 2-4 us before the kernel starts (the overload's Python frame,
// the arguments parsed against the schema into a boxed stack, the boxed dispatch and the
// unboxing), where torch's own cross_entropy binding costs well under one. The functions below
// call the op's Autograd kernel (csrc/autograd.cpp) themselves, unboxed, which is where the
// dispatcher would send the call, and do so only where nothing else could have taken it on the
// way: CPU tensors of class torch.Tensor (or nn.Parameter) with the plain dispatch keys, the
// thread's dispatch key sets at their defaults (no autocast, inference mode, TorchDispatchMode,
// functorch transform or JIT tracer), no __torch_function__ mode and no RecordFunction callback
// (a profiler records the op). Anywhere else they return None and the caller calls the op.
// torch.compile never reaches them: the callers skip them while compiling.
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

// The Python arguments of a direct call, read by type. A value that does not qualify (a tensor
// that is not a plain CPU torch.Tensor or nn.Parameter, a number of another type) clears ok: the
// call then returns None.
struct Args {
  PyObject* const* args;
  bool ok = true;

  // A torch.Tensor (or nn.Parameter) on the CPU whose dispatch keys are a plain dense tensor's:
  // not an inference tensor, a conjugate or negative view, or any other wrapper.
  at::Tensor tensor(int i) {
    static const c10::DispatchKeySet plain(
        {c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradCPU,
         c10::DispatchKey::AutocastCPU});
    if (THPVariable_CheckExact(args[i])) {
      const at::Tensor& t = THPVariable_Unpack(args[i]);
      if (t.key_set() == plain) return t;
    }
    ok = false;
    return at::Tensor();
  }
  std::optional<at::Tensor> tensor_or_none(int i) {
    if (args[i] == Py_None) return std::nullopt;
    return tensor(i);
  }
  int64_t integer(int i) {
    int overflow = 1;
    const int64_t v = PyLong_Check(args[i]) ? PyLong_AsLongLongAndOverflow(args[i], &overflow) : 0;
    ok = ok && overflow == 0;
    return v;
  }
  double number(int i) {  // a float or an int, as the Python functionals take them
    if (PyFloat_CheckExact(args[i])) return PyFloat_AS_DOUBLE(args[i]);
    const double v = PyLong_CheckExact(args[i]) ? PyLong_AsDouble(args[i]) : -1.0;
    if (v == -1.0 && (!PyLong_CheckExact(args[i]) || PyErr_Occurred())) {
      PyErr_Clear();  // (an int too large for a double)
      ok = false;
    }
    return v;
  }
  bool flag(int i) {
    ok = ok && PyBool_Check(args[i]);
    return args[i] == Py_True;
  }
  // 'none', 'mean', 'sum', 'batchmean' -> 0..3, the ops' reduction codes; each op checks its own.
  int64_t reduction(int i) {
    const char* names[] = {"none", "mean", "sum", "batchmean"};
    for (int64_t r = 0; r < 4 && PyUnicode_Check(args[i]); ++r)
      if (PyUnicode_CompareWithASCIIString(args[i], names[r]) == 0) return r;
    ok = false;
    return -1;
  }
};

// The GIL released while the kernels run, as the dispatcher's Python binding does.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const c10::DispatchKeySet kAutograd(c10::DispatchKey::AutogradCPU);

// A direct call of a whole-loss op with nargs Python arguments: read(a) reads them and returns
// the call of the op's Autograd kernel, run with the GIL released. The loss, or None where the
// call does not apply or the op's checks reject the arguments (the caller's Python checks then
// raise the error that names the bad argument); an IndexError (a class index out of range) is
// raised, as the op raises it.
template <typename Read>
PyObject* direct_call(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, Read&& read) {
  HANDLE_TH_ERRORS
  if (nargs != want || !default_dispatch_state()) Py_RETURN_NONE;
  Args a{args};
  auto call = read(a);
  if (!a.ok) Py_RETURN_NONE;
  at::Tensor out;
  try {
    ReleaseGil no_gil;
    out = call();
  } catch (const c10::IndexError&) {
    throw;
  } catch (const c10::Error&) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// The results below are in the input's dtype: autocast is off wherever a direct call runs.

// cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, z_loss); int64
// targets only (as the functional's fast path).
PyObject* cross_entropy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return direct_call(args, nargs, 7, [](Args& a) {
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           int64_t, int64_t, double, double, at::ScalarType);
    static const auto op = typed_op<Sig>("fusedloss::cross_entropy");
    const at::Tensor x = a.tensor(0), t = a.tensor(1);
    const std::optional<at::Tensor> w = a.tensor_or_none(2);
    const int64_t reduction = a.reduction(3), ignore_index = a.integer(4);
    const double label_smoothing = a.number(5), z_loss = a.number(6);
    a.ok = a.ok && t.scalar_type() == at::kLong;
    return [=] {
      return op.redispatch(kAutograd, x, t, w, reduction, ignore_index, label_smoothing, z_loss,
                           x.scalar_type());
    };
  });
}

// elementwise_loss(kind, input, target, weight, pos_weight, delta, flag, reduction).
PyObject* elementwise_loss(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return direct_call(args, nargs, 8, [](Args& a) {
    using Sig = at::Tensor(int64_t, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           double, bool, int64_t, at::ScalarType);
    static const auto op = typed_op<Sig>("fusedloss::elementwise_loss");
    const int64_t kind = a.integer(0);
    const at::Tensor x = a.tensor(1), y = a.tensor(2);
    const std::optional<at::Tensor> w = a.tensor_or_none(3), pw = a.tensor_or_none(4);
    const double delta = a.number(5);
    const bool flag = a.flag(6);
    const int64_t reduction = a.reduction(7);
    return [=] {
      return op.redispatch(kAutograd, kind, x, y, w, pw, delta, flag, reduction, x.scalar_type());
    };
  });
}

// distillation(student, teacher, target, temperature, beta, ignore_index, hard_weight, reduction).
PyObject* distillation(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return direct_call(args, nargs, 8, [](Args& a) {
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, double, int64_t, double, int64_t, at::ScalarType);
    static const auto op = typed_op<Sig>("fusedloss::distillation");
    const at::Tensor s = a.tensor(0), t = a.tensor(1);
    const std::optional<at::Tensor> y = a.tensor_or_none(2);
    const double temperature = a.number(3), beta = a.number(4);
    const int64_t ignore_index = a.integer(5);
    const double hard_weight = a.number(6);
    const int64_t reduction = a.reduction(7);
    return [=] {
      return op.redispatch(kAutograd, s, t, y, temperature, beta, ignore_index, hard_weight,
                           reduction, s.scalar_type());
    };
  });
}

// softmax_focal(input, target, alpha, gamma, ignore_index, reduction); int64 targets only.
PyObject* softmax_focal(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return direct_call(args, nargs, 6, [](Args& a) {
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, int64_t, int64_t, at::ScalarType);
    static const auto op = typed_op<Sig>("fusedloss::softmax_focal");
    const at::Tensor x = a.tensor(0), t = a.tensor(1);
    const std::optional<at::Tensor> alpha = a.tensor_or_none(2);
    const double gamma = a.number(3);
    const int64_t ignore_index = a.integer(4), reduction = a.reduction(5);
    a.ok = a.ok && t.scalar_type() == at::kLong;
    return [=] {
      return op.redispatch(kAutograd, x, t, alpha, gamma, ignore_index, reduction,
                           x.scalar_type());
    };
  });
}

#define FL_DIRECT(name)                                                                      \
  {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(name)), METH_FASTCALL, \
   "fusedloss::" #name "'s eager fast path (csrc/python.cpp); None where it does not apply."}

PyMethodDef methods[] = {FL_DIRECT(cross_entropy), FL_DIRECT(elementwise_loss),
                         FL_DIRECT(distillation), FL_DIRECT(softmax_focal),
                         {nullptr, nullptr, 0, nullptr}};
#undef FL_DIRECT

}  // namespace
}  // namespace fusedloss

// `import fusedloss._C` loads this library, which runs the op registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                   fusedloss::methods};
  return PyModule_Create(&def);
}
