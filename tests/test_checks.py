"""Checks that span every loss: exception classes, the device guard of every Triton launch, meta
and fake tensors, and (with CUDA) the device-side range check that does not synchronise."""
import ast
import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

import fusedloss
import fusedloss.kernels
from fusedloss import _backend
from fusedloss import functional as F
from conftest import requires_cuda

ROOT = pathlib.Path(fusedloss.__file__).parent

# ---------------------------------------------------------------- exceptions

# The modules that validate loss arguments (training.py has its own rules).
LOSS_MODULES = ["_common", "_elementwise", "bce", "cross_entropy", "distributed", "focal", "huber",
                "kl_div", "distillation", "linear_cross_entropy"]


def test_no_plain_value_or_type_error_in_loss_modules():
    """Every raise of ValueError / TypeError in the loss modules uses the classes that are also
    RuntimeErrors (fusedloss._common), so code that catches torch's RuntimeError catches ours."""
    plain = []
    for name in LOSS_MODULES:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in ("ValueError", "TypeError"):
                    plain.append(f"{name}.py:{node.lineno} raises {exc.id}")
    assert not plain, "\n".join(plain)


x45 = torch.randn(4, 5)
t4 = torch.tensor([0, 1, 2, 3])
# (ours, torch's) on the same bad input
BAD = {
    "ce reduction": lambda f: f.cross_entropy(x45, t4, reduction="avg"),
    "ce target shape": lambda f: f.cross_entropy(x45, t4[:3]),
    "ce target dtype": lambda f: f.cross_entropy(x45, t4.int()),
    "ce weight shape": lambda f: f.cross_entropy(x45, t4, weight=torch.rand(4)),
    "ce label_smoothing": lambda f: f.cross_entropy(x45, t4, label_smoothing=1.5),
    "ce out of range": lambda f: f.cross_entropy(x45, torch.tensor([0, 1, 5, 2])),
    "ce integer input": lambda f: f.cross_entropy(x45.long(), t4),
    "ce probability shape": lambda f: f.cross_entropy(x45, torch.rand(4, 3)),
    "bce shape": lambda f: f.binary_cross_entropy_with_logits(x45, torch.rand(4, 3)),
    "bce reduction": lambda f: f.binary_cross_entropy_with_logits(x45, x45, reduction="avg"),
    "bce weight": lambda f: f.binary_cross_entropy_with_logits(x45, x45, weight=torch.rand(3)),
    "huber delta": lambda f: f.huber_loss(x45, x45, delta=0.0),
    "huber broadcast": lambda f: f.huber_loss(x45, torch.rand(3)),
    "huber integer": lambda f: f.huber_loss(t4, t4),
    "smooth_l1 beta": lambda f: f.smooth_l1_loss(x45, x45, beta=-1.0),
    "smooth_l1 reduction": lambda f: f.smooth_l1_loss(x45, x45, reduction="avg"),
}


@pytest.mark.filterwarnings("ignore:.*target size")
@pytest.mark.parametrize("case", list(BAD))
def test_errors_catchable_as_torchs(case):
    """Whatever torch raises for a bad input, the same except clause catches ours: its class, or
    RuntimeError where torch raises a RuntimeError subclass (NotImplementedError for a dtype)."""
    with pytest.raises(Exception) as theirs:
        BAD[case](TF)
    with pytest.raises(Exception) as ours:
        BAD[case](F)
    want = theirs.type if not issubclass(theirs.type, RuntimeError) else RuntimeError
    assert isinstance(ours.value, want), f"torch: {theirs.type.__name__}, ours: {ours.type.__mro__}"
    assert isinstance(ours.value, (ValueError, TypeError, IndexError))


# ---------------------------------------------------------------- device guard


def _kernel_names():
    """Every Triton kernel (a jitted `_..._kernel`) in fusedloss.kernels."""
    import importlib

    names = set()
    for mod in pkgutil.iter_modules(fusedloss.kernels.__path__):
        m = importlib.import_module(f"fusedloss.kernels.{mod.name}")
        for attr, v in vars(m).items():
            if attr.endswith("_kernel") and hasattr(v, "run") and hasattr(v, "arg_names"):
                names.add(attr)
    return names


def _every_loss(device):
    """Forward and backward of every loss on the triton backend (tiny shapes)."""
    x = torch.randn(4, 5, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 4, -100], device=device)
    y = torch.rand(4, 5, device=device)
    w = torch.rand(5, device=device)
    for loss in [F.cross_entropy(x, t, weight=w, label_smoothing=0.1),
                 F.cross_entropy(x * 1.0, t, inplace_backward=True),
                 F.binary_cross_entropy_with_logits(x, y, pos_weight=w),
                 F.huber_loss(x, y), F.smooth_l1_loss(x, y),
                 F.sigmoid_focal_loss(x, y, reduction="sum"),
                 F.softmax_focal_loss(x, t, alpha=w),
                 F.kl_div(torch.log_softmax(x, 1), y, reduction="batchmean"),
                 F.distillation_loss(x, y, t, beta=0.5, hard_weight=0.5),
                 F.linear_cross_entropy(x, torch.randn(7, 5, device=device), t.clamp(0, 6))]:
        loss.backward()
    # (N, C, H, W) with contiguous pixels: the spatial tile kernels
    x4 = torch.randn(2, 5, 4, 4, device=device, requires_grad=True)
    t4 = torch.randint(0, 5, (2, 4, 4), device=device)
    for loss in [F.cross_entropy(x4, t4), F.softmax_focal_loss(x4, t4)]:
        loss.backward()
    # wide rows (C > kernels._common.ROWS_MAX_C): the one-row-per-program kernels
    xw = torch.randn(2, 3000, device=device, requires_grad=True)
    tw = torch.tensor([2999, 0], device=device)
    for loss in [F.cross_entropy(xw, tw), F.softmax_focal_loss(xw, tw)]:
        loss.backward()


def test_every_triton_launch_is_under_the_device_guard(monkeypatch):
    """Each kernel launch runs inside kernels._common.device_guard of its tensors' device (Triton
    launches on the current CUDA device), and every kernel of fusedloss.kernels is launched here:
    a new kernel must be added to _every_loss, and a launcher without the guard fails."""
    from fusedloss.kernels import _common as kc
    from fusedloss.kernels import cross_entropy as kce

    monkeypatch.setattr(_backend, "_ENV", "triton")
    kernel_cls = type(kce._cross_entropy_fwd_kernel)
    original = kernel_cls.run
    launches = []

    def run(self, *args, **kwargs):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        launches.append((self.__name__, list(kc.device_guard.active), tensor.device))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kernel_cls, "run", run)
    device = (torch.device("cuda", torch.cuda.device_count() - 1) if torch.cuda.is_available()
              else torch.device("cpu"))
    _every_loss(device)
    unguarded = [name for name, active, dev in launches if not active or active[-1] != dev]
    assert not unguarded, f"launched outside device_guard(tensor): {sorted(set(unguarded))}"
    missing = _kernel_names() - {name for name, _, _ in launches}
    assert not missing, f"kernels this test never launches (add them to _every_loss): {missing}"


def test_device_guard_sets_the_cuda_device():
    """On CUDA the guard makes the tensor's device current for the launch, then restores it."""
    from fusedloss.kernels._common import device_guard

    x = torch.zeros(1)
    with device_guard(x):
        assert device_guard.active == [x.device]
    assert device_guard.active == []
    if torch.cuda.is_available():
        last = torch.device("cuda", torch.cuda.device_count() - 1)
        before = torch.cuda.current_device()
        with device_guard(torch.zeros(1, device=last)):
            assert torch.cuda.current_device() == last.index
        assert torch.cuda.current_device() == before


# ---------------------------------------------------------------- meta and fake tensors

META_CASES = {
    "cross_entropy": lambda x, t, y, w: F.cross_entropy(x, t, weight=w, label_smoothing=0.1),
    "cross_entropy none": lambda x, t, y, w: F.cross_entropy(x, t, reduction="none"),
    "cross_entropy probs": lambda x, t, y, w: F.cross_entropy(x, y),
    "bce": lambda x, t, y, w: F.binary_cross_entropy_with_logits(x, y, pos_weight=w),
    "huber": lambda x, t, y, w: F.huber_loss(x, y, reduction="none"),
    "smooth_l1": lambda x, t, y, w: F.smooth_l1_loss(x, y),
    "sigmoid_focal": lambda x, t, y, w: F.sigmoid_focal_loss(x, y, normalizer=2.0, reduction="sum"),
    "softmax_focal": lambda x, t, y, w: F.softmax_focal_loss(x, t, alpha=w),
    "softmax_focal none": lambda x, t, y, w: F.softmax_focal_loss(x, t, reduction="none"),
}


def _shapes_and_dtypes(device, dtype):
    x = torch.randn(4, 5, device=device, dtype=dtype, requires_grad=True)
    t = torch.zeros(4, dtype=torch.long, device=device)
    y = torch.rand(4, 5, device=device, dtype=dtype)
    w = torch.rand(5, device=device)
    out = {name: fn(x, t, y, w) for name, fn in META_CASES.items()}
    for loss in out.values():
        loss.sum().backward()
    return {name: (o.shape, o.dtype) for name, o in out.items()}, (x.grad.shape, x.grad.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("env", ["", "triton"])
def test_meta_and_fake_tensors(monkeypatch, env, dtype):
    """Meta and FakeTensorMode inputs run through the ops' fake kernels (no value is read), forward
    and backward, with the shapes and dtypes of real inputs, whatever FUSEDLOSS_BACKEND says."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _shapes_and_dtypes("cpu", dtype)
    monkeypatch.setattr(_backend, "_ENV", env)
    assert _shapes_and_dtypes("meta", dtype) == real
    with FakeTensorMode():
        assert _shapes_and_dtypes("cpu", dtype) == real


# ---------------------------------------------------------------- CUDA: device-side range check


@requires_cuda
def test_cuda_losses_do_not_synchronise():
    """Forward and backward of the class-index losses on CUDA make no host sync (the range check
    is a device-side assertion)."""
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    F.cross_entropy(x, t).backward()  # warm-up (compiles the kernels)
    F.softmax_focal_loss(x, t).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.cross_entropy(x, t, label_smoothing=0.1).backward()
        F.softmax_focal_loss(x, t, alpha=0.25).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.parametrize("loss", ["cross_entropy", "softmax_focal_loss"])
@pytest.mark.parametrize("value", [5, -1])
def test_cuda_bad_target_device_assert(loss, value):
    """On CUDA an out-of-range target trips a device-side assertion: the next synchronising call
    raises RuntimeError (run in a subprocess: the CUDA context is lost afterwards)."""
    script = (f"import torch, fusedloss\n"
              f"x = torch.randn(4, 5, device='cuda')\n"
              f"t = torch.tensor([0, 1, {value}, 2], device='cuda')\n"
              f"try:\n"
              f"    fusedloss.functional.{loss}(x, t).item()\n"
              f"except RuntimeError as e:\n"
              f"    print('RAISED', 'device-side assert' in str(e))\n")
    env = {k: v for k, v in os.environ.items() if k != "FUSEDLOSS_BACKEND"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert "RAISED True" in out.stdout, out.stdout + out.stderr[-2000:]


# ---------------------------------------------------------------- one-pass loss and gradient (CPU)

# A reduced element-wise loss whose input needs a gradient computes that gradient in its forward
# on the CPU (csrc/autograd.cpp ew_forward_grad); backward hands it over when grad_output is 1
# and recomputes otherwise. Each case: (fusedloss call, torch's float64 reference).
ONE_PASS = {
    "bce_pos_weight": (
        lambda x, y: F.binary_cross_entropy_with_logits(x, y.sigmoid(), pos_weight=y.detach()[0].abs()),
        lambda x, y: TF.binary_cross_entropy_with_logits(x, y.sigmoid(), pos_weight=y.detach()[0].abs())),
    "huber": (lambda x, y: F.huber_loss(x, y, delta=0.5, reduction="sum"),
              lambda x, y: TF.huber_loss(x, y, delta=0.5, reduction="sum")),
    "smooth_l1": (lambda x, y: F.smooth_l1_loss(x, y, beta=0.5),
                  lambda x, y: TF.smooth_l1_loss(x, y, beta=0.5)),
    "kl_batchmean": (lambda x, y: F.kl_div(x, y.softmax(-1), reduction="batchmean"),
                     lambda x, y: TF.kl_div(x, y.softmax(-1), reduction="batchmean")),
}


def _one_pass_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 129, generator=g, dtype=torch.float64) * 2)  # 2 chunks, a lane tail
    y = torch.randn(37, 129, generator=g, dtype=torch.float64)
    return x.to(dtype).requires_grad_(), y.to(dtype)


def _ops_called(fn):
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.function_events}


@pytest.mark.parametrize("case", list(ONE_PASS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_one_pass_gradient(monkeypatch, case, dtype):
    """The gradient handed over from forward equals the float64 reference, no backward kernel
    runs for it, and a second backward (retain_graph) recomputes the same values."""
    monkeypatch.setattr(_backend, "_ENV", "cpp")
    ours, ref = ONE_PASS[case]
    x, y = _one_pass_inputs(dtype)
    loss = ours(x, y)
    called = _ops_called(lambda: loss.backward(retain_graph=True))
    assert not any(n.startswith("fusedloss::") and n.endswith("_bwd") for n in called), called
    g1 = x.grad.clone()
    xd = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(ref(xd, y.double()), xd)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(g1.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    x.grad = None
    called = _ops_called(lambda: loss.backward())
    assert any(n.endswith("_bwd") for n in called), called  # recomputed from input and target
    if case == "kl_batchmean" and dtype == torch.bfloat16:
        # the recompute path takes grad_output / batch rounded to bf16; forward's factor is fp32
        torch.testing.assert_close(x.grad, g1, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(x.grad, g1)


@pytest.mark.parametrize("case", list(ONE_PASS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_grad_output_not_one_recomputes(monkeypatch, case, dtype):
    """A grad_output other than 1 (a loss scale) takes the recompute path, which applies it
    before the one rounding: the same gradient as a graph that never took the one-pass path
    (the target needing a gradient too)."""
    monkeypatch.setattr(_backend, "_ENV", "cpp")
    ours, _ = ONE_PASS[case]
    x, y = _one_pass_inputs(dtype)
    scale = torch.tensor(1024.0 / 3.0, dtype=dtype)
    (g,) = torch.autograd.grad(ours(x, y), x, grad_outputs=scale)
    (want, _) = torch.autograd.grad(ours(x, y.requires_grad_()), (x, y), grad_outputs=scale)
    assert torch.equal(g, want)


def test_one_pass_input_modified_in_place_raises(monkeypatch):
    monkeypatch.setattr(_backend, "_ENV", "cpp")
    x, y = _one_pass_inputs(torch.float32)
    x = x.detach().clone().requires_grad_()
    xi = x * 1  # a non-leaf that can be modified in place
    loss = F.huber_loss(xi, y)
    xi.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- direct calls (csrc/python.cpp)

def _direct_cases():
    """name -> (the direct call, the functional) on logits x; the direct call as the functional
    makes it."""
    C = _backend.C_MODULE
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([0, 4, 2, 1])
    y = torch.randn(4, 5, generator=g)
    return {
        "cross_entropy": (lambda x: C.cross_entropy(x, t, None, "mean", -100, 0.0, 0.0),
                          lambda x: F.cross_entropy(x, t)),
        "huber": (lambda x: C.elementwise_loss(1, x, y, None, None, 0.5, False, "sum"),
                  lambda x: F.huber_loss(x, y, delta=0.5, reduction="sum")),
        "distillation": (lambda x: C.distillation(x, y, None, 2.0, 0.0, -100, 0.0, "batchmean"),
                         lambda x: F.distillation_loss(x, y, temperature=2.0)),
        "softmax_focal": (lambda x: C.softmax_focal(x, t, None, 2.0, -100, "mean"),
                          lambda x: F.softmax_focal_loss(x, t)),
    }


class _SeenOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _FunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
@pytest.mark.parametrize("case", ["cross_entropy", "huber", "distillation", "softmax_focal"])
def test_direct_calls_only_in_plain_eager(case):
    """The direct calls (an op's Autograd kernel without the dispatcher) decline, returning None,
    wherever the dispatcher or Python could have taken the call: a mode, a tracer, a functorch
    transform, a profiler, autocast, inference mode, a tensor that is not a plain dense CPU
    torch.Tensor. There the functional calls the op, which the mode sees, with the same result
    (a negative view read as its memory would give another loss)."""
    direct, functional = _direct_cases()[case]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(6)) * 3
    want = direct(x)
    assert want is not None
    assert torch.equal(functional(x), want)
    with torch.inference_mode():
        inference_x = x.clone()
    for bad in [x._neg_view(), x.as_subclass(_Subclass), inference_x, x.to("meta")]:
        assert direct(bad) is None
    torch.testing.assert_close(functional(x._neg_view()), direct(-x))
    contexts = {"dispatch mode": _SeenOps, "function mode": _FunctionMode,
                "autocast": lambda: torch.autocast("cpu"), "inference mode": torch.inference_mode,
                "profiler": torch.autograd.profiler.profile}
    op = {"huber": "elementwise_loss"}.get(case, case)
    for name, ctx in contexts.items():
        with ctx() as mode:
            assert direct(x) is None, name
            torch.testing.assert_close(functional(x), want)
        if name == "dispatch mode":  # the kernels under the op's autograd reached the mode
            assert any(o.startswith("fusedloss.") for o in mode.ops), mode.ops
        if name == "profiler":
            assert f"fusedloss::{op}" in {e.name for e in mode.function_events}
    seen = []
    torch.func.grad(lambda x: seen.append(direct(x)) or x.sum())(x)
    torch.jit.trace(lambda x: seen.append(direct(x)) or x.sum(), (x,), check_trace=False)
    assert seen == [None, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_direct_calls_are_the_ops(dtype):
    """The element-wise, distillation and softmax focal direct calls return what their ops
    return, loss and gradient bit for bit, for each loss kind, reduction and option
    (cross-entropy's: test_cross_entropy.py); arguments an op rejects give None (the functional
    then names them)."""
    C = _backend.C_MODULE
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).to(dtype)

    y, w, pw = r(6, 7), r(6, 7).abs(), r(7).abs()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p = y.double().sigmoid().to(dtype)
    t = torch.randint(0, 7, (6,), generator=g)
    t[2] = -1
    ew = torch.ops.fusedloss.elementwise_loss.default
    cases = []  # (direct, op, arguments after the input)
    for red, code in [("none", 0), ("mean", 1), ("sum", 2)]:
        cases += [(C.elementwise_loss, ew, (0, p, w, pw, 0.0, False), red, code),
                  (C.elementwise_loss, ew, (1, y, w, None, 0.5, False), red, code),
                  (C.elementwise_loss, ew, (1, y, None, None, 0.5, True), red, code)]
    for red, code in [("none", 0), ("sum", 2), ("batchmean", 3)]:
        cases += [(C.elementwise_loss, ew, (2, p, None, None, 0.0, False), red, code),
                  (C.elementwise_loss, ew, (2, y.double().log_softmax(-1).to(dtype), None, None,
                                            0.0, True), red, code)]
    for red, code in [("none", 0), ("mean", 1), ("sum", 2), ("batchmean", 3)]:
        for beta, target, hard in [(0.0, None, 0.0), (0.5, t, 0.3), (1.0, t, 0.0)]:
            cases.append((C.distillation, torch.ops.fusedloss.distillation.default,
                          (y, target, 2.0, beta, -1, hard), red, code))
    for red, code in [("none", 0), ("mean", 1), ("sum", 2)]:
        for alpha, gamma in [(None, 2.0), (w[0].to(acc), 0.0), (w[1].to(acc), 1.5)]:
            cases.append((C.softmax_focal, torch.ops.fusedloss.softmax_focal.default,
                          (t, alpha, gamma, -1), red, code))
    for direct, op, rest, red, code in cases:
        x = r(6, 7).requires_grad_()
        if direct is C.elementwise_loss:
            kind, rest = rest[0], rest[1:]
            ours = direct(kind, x, *rest, red)
            want = op(kind, x, *rest, code, dtype)
        else:
            ours = direct(x, *rest, red)
            want = op(x, *rest, code, dtype)
        assert ours is not None and ours.dtype == want.dtype and torch.equal(ours, want), rest
        go = torch.rand_like(want)
        assert torch.equal(torch.autograd.grad(ours, x, go)[0], torch.autograd.grad(want, x, go)[0])
    x = r(6, 7)
    for bad in [(0, x, y[:3], None, None, 0.0, False, "mean"),  # shape
                (1, x, y, None, None, -1.0, False, "mean"),  # delta
                (1, x, y, None, None, 0.5, 1, "mean"),  # flag not a bool
                (0, x, y, None, None, 0.0, False, "avg")]:
        assert C.elementwise_loss(*bad) is None
    assert C.distillation(x, y.detach().requires_grad_(), None, 1.0, 0.0, -1, 0.0, "sum") is None


# ---------------------------------------------------------------- CUDA registrations

KERNEL_OPS = ["cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_inplace",
              "sigmoid_focal_fwd", "softmax_focal_fwd", "bce_fwd", "bce_bwd", "huber_fwd",
              "huber_bwd", "kl_div_fwd", "kl_div_bwd", "distill_fwd", "distill_bwd",
              "distill_bwd_inplace", "linear_cross_entropy"]


@pytest.mark.skipif(not (_backend.HAS_CPP and _backend.HAS_TRITON), reason="needs C++ and triton")
def test_every_kernel_op_has_its_triton_kernel_for_cuda():
    """Each op with a CPU kernel in C++ has its Triton launcher registered for CUDA tensors (checked
    in the dispatcher's table, so that a registration lost to a code move shows without a GPU)."""
    missing = [name for name in KERNEL_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fusedloss::{name}", "CUDA")]
    assert not missing, missing
