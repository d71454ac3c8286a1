"""BCE-with-logits: parity with torch.nn.functional.binary_cross_entropy_with_logits in float64,
gradients for input and target, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fusedloss
from fusedloss._elementwise import view4
from fusedloss.functional import binary_cross_entropy_with_logits as bce
from conftest import assert_compiled_matches_eager, check_elementwise_runs

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SHAPES = [(), (7,), (5, 6), (2, 3, 4, 5)]


def make(shape, dtype, device, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    y = torch.rand(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, y


def check(x, y, grad_out=None, atol=None, **kw):
    """Loss and input/target gradients of fusedloss vs torch in float64 on the same values."""
    atol = ATOL[x.dtype] if atol is None else atol
    xa, ya = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    xr, yr = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = bce(xa, ya, **kw)
    ref = F.binary_cross_entropy_with_logits(xr, yr, **kw64)
    assert out.dtype == y.dtype and out.shape == ref.shape
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol * scale, rtol=atol,
                               equal_nan=True)
    go = torch.randn_like(ref) if grad_out is None else grad_out.double()
    gr = torch.autograd.grad(ref, (xr, yr), go)
    g = torch.autograd.grad(out, (xa, ya), go.to(out.dtype))
    for a, b in zip(g, gr):
        assert a.dtype == x.dtype and a.shape == b.shape
        gscale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
        torch.testing.assert_close(a.double(), b, atol=atol * gscale, rtol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_shapes_dtypes(backend, shape, dtype, reduction):
    x, y = make(shape, dtype, backend.device)
    check(x, y, reduction=reduction)


# (weight shape, pos_weight shape) for input (2, 3, 4, 5): per class is (3, 1, 1), as in torch.
WEIGHTS = [(None, (3, 1, 1)), ((3, 1, 1), None), ((5,), (3, 1, 1)), ((2, 3, 4, 5), (4, 5)),
           ((), (1, 1, 1, 1)), ((4, 1), (2, 1, 1, 5))]


@pytest.mark.parametrize("wshape,pshape", WEIGHTS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_weight_pos_weight_broadcast(backend, wshape, pshape, reduction):
    x, y = make((2, 3, 4, 5), torch.float32, backend.device)
    g = torch.Generator().manual_seed(1)
    w = None if wshape is None else torch.rand(wshape, generator=g).to(backend.device) + 0.2
    pw = None if pshape is None else torch.rand(pshape, generator=g).to(backend.device) * 3
    check(x, y, weight=w, pos_weight=pw, reduction=reduction)


def test_hard_targets_and_2d_pos_weight(backend):
    x, _ = make((6, 4), torch.float32, backend.device)
    y = (torch.rand(6, 4) > 0.5).float().to(backend.device)
    check(x, y, pos_weight=torch.tensor([1.0, 2.0, 0.5, 4.0], device=backend.device))


def test_non_contiguous(backend):
    x, y = make((6, 8), torch.float32, backend.device)
    w = torch.rand(8, 3, device=backend.device)[:, 0]  # strided weight
    pw = torch.rand(12, device=backend.device)[::2] * 2  # strided pos_weight
    check(x.t(), y.t(), weight=w[:, None], pos_weight=pw)
    check(x[:, ::2], y[:, ::2], reduction="sum", weight=w[::2])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_grad_output(backend, reduction):
    x, y = make((3, 4), torch.float32, backend.device)
    go = torch.randn(3, 4) if reduction == "none" else torch.tensor(-2.5)
    check(x, y, grad_out=go.to(backend.device), reduction=reduction,
          weight=torch.rand(4, device=backend.device))


@pytest.mark.parametrize("x0", [37.0, 40.0, -37.0, -40.0])
def test_extreme_logits_float64(backend, x0):
    """Both branches keep their tiny values (torch returns 0 on one of them)."""
    x = torch.tensor([x0, -x0], dtype=torch.float64, device=backend.device, requires_grad=True)
    # The target that makes element 0's loss tiny (and element 1's large): y = 1 iff x0 > 0.
    y = torch.full((2,), float(x0 > 0), dtype=torch.float64, device=backend.device)
    loss = bce(x, y, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    t = torch.tensor(-abs(x0), dtype=torch.float64)
    tiny = torch.log1p(torch.exp(t))  # softplus(-|x|), about 1e-16 .. 4e-18
    sig = torch.exp(t) / (1 + torch.exp(t))  # sigmoid(-|x|)
    assert tiny > 0 and sig > 0
    # element 0: confident and right (tiny loss, tiny gradient toward the target's side)
    torch.testing.assert_close(loss[0].cpu(), tiny, rtol=1e-13, atol=0)
    torch.testing.assert_close(g[0].cpu(), -sig if x0 > 0 else sig, rtol=1e-13, atol=0)
    # element 1: confident and wrong (loss |x| + tiny, gradient +-(1 - tiny))
    torch.testing.assert_close(loss[1].cpu(), abs(x0) + tiny, rtol=1e-15, atol=0)
    torch.testing.assert_close(g[1].cpu(), (1 - sig) * (-1 if x0 > 0 else 1), rtol=1e-15, atol=0)
    # the target gradient softplus(-x) - softplus(x) = -x exactly enough, on both branches
    y2 = y.clone().requires_grad_()
    (gy,) = torch.autograd.grad(bce(x.detach(), y2, reduction="sum"), y2)
    torch.testing.assert_close(gy, -x.detach(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("x0", [37.0, -40.0, 80.0])
def test_extreme_logits_tiny_fp32(backend, x0):
    """The same tiny values in fp32 (exp(-|x|) is still a normal fp32 number there)."""
    x = torch.tensor([x0], device=backend.device, requires_grad=True)
    y = torch.full((1,), float(x0 > 0), device=backend.device)
    loss = bce(x, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    e = torch.exp(torch.tensor(-abs(x0), dtype=torch.float64))
    torch.testing.assert_close(loss.double().cpu(), torch.log1p(e), rtol=1e-5, atol=0)
    torch.testing.assert_close(g.double().cpu()[0], (-e if x0 > 0 else e) / (1 + e), rtol=1e-5,
                               atol=0)


def test_extreme_logits_finite(backend):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 6e4], device=backend.device)
        x = x.to(dtype).requires_grad_()
        y = torch.tensor([0.0, 1.0, 0.5, 0.3, 1.0, 0.0, 0.9], device=backend.device, dtype=dtype)
        loss = bce(x, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss.float()) and torch.isfinite(g.float()).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck(backend, reduction):
    x, y = make((2, 3, 2), torch.float64, backend.device)
    x.requires_grad_()
    y.requires_grad_()
    w = torch.rand(3, 1, dtype=torch.float64, device=backend.device) + 0.5
    pw = torch.rand(2, dtype=torch.float64, device=backend.device) * 2
    assert torch.autograd.gradcheck(
        lambda a, b: bce(a, b, weight=w, pos_weight=pw, reduction=reduction), (x, y))


def test_empty(backend):
    x = torch.empty(0, 3, device=backend.device, requires_grad=True)
    y = torch.empty(0, 3, device=backend.device)
    assert bce(x, y, reduction="mean").isnan()
    assert bce(x, y, reduction="sum").item() == 0.0
    out = bce(x, y, reduction="none")
    assert out.shape == (0, 3)
    (g,) = torch.autograd.grad(bce(x, y, reduction="sum"), x)
    assert g.shape == (0, 3)


@pytest.mark.parametrize("xd,yd", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                   (torch.float32, torch.float64), (torch.bfloat16, torch.float16)])
def test_mixed_dtypes(backend, xd, yd):
    x, y = make((4, 3), torch.float64, backend.device, scale=2.0)
    x, y = x.to(xd), y.to(yd)
    out = bce(x, y)
    ref = F.binary_cross_entropy_with_logits(x.double(), y.double())
    assert out.dtype == F.binary_cross_entropy_with_logits(x, y).dtype == yd
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_views_not_copies():
    """Broadcast weights and transposed inputs reach the kernel as views of their memory."""
    x = torch.randn(2, 3, 4, 5)
    w = torch.rand(3, 1, 1)
    xt = x.transpose(2, 3)
    vx, vw = view4(xt, w.expand(xt.shape))
    assert vx.data_ptr() == x.data_ptr() and vw.data_ptr() == w.data_ptr()
    assert vx.dim() == 4 and vw.stride().count(0) >= 2
    assert view4(x)[0].shape == (1, 1, 1, 120)  # contiguous: one run


def test_deterministic_over_threads():
    x, y = make((1000, 37), torch.float32, "cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = bce(x, y, reduction="sum")
        torch.set_num_threads(max(2, n))
        b = bce(x, y, reduction="sum")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target=torch.rand(3, 5)), ValueError, "Target size"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(target=torch.ones(3, 4, dtype=torch.long)), TypeError, "target"),
    (dict(weight=torch.rand(5)), ValueError, "weight"),
    (dict(weight=torch.rand(2, 3, 4)), ValueError, "weight"),  # would enlarge the output
    (dict(pos_weight=torch.rand(3)), ValueError, "pos_weight"),
    (dict(pos_weight=torch.rand(4, requires_grad=True)), ValueError, "pos_weight"),
    (dict(weight=torch.rand(4, requires_grad=True)), ValueError, "weight"),
    (dict(input=torch.ones(3, 4, dtype=torch.long)), TypeError, "input"),
])
def test_bad_input(backend, kwargs, exc, match):
    args = dict(input=torch.randn(3, 4), target=torch.rand(3, 4))
    args.update(kwargs)
    args = {k: v.to(backend.device) if isinstance(v, torch.Tensor) and k in ("input", "target")
            else v for k, v in args.items()}
    if backend.device.type != "cpu":
        args = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
                for k, v in args.items()}
    with pytest.raises(exc, match=match):
        bce(**args)


def test_module_matches_torch():
    x, y = make((4, 3, 2), torch.float32, "cpu")
    w, pw = torch.rand(3, 1), torch.rand(2) + 0.5
    ours = fusedloss.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    theirs = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    torch.testing.assert_close(ours(x, y), theirs(x, y))
    assert set(dict(ours.named_buffers())) == {"weight", "pos_weight"}
    assert "reduction='sum'" in repr(ours)
    legacy = fusedloss.BCEWithLogitsLoss(size_average=False)
    assert legacy.reduction == "sum"


def test_opcheck():
    x, y = make((2, 3, 4, 5), torch.float32, "cpu")
    w = torch.rand(3, 1, 1).expand(2, 3, 4, 5)
    for xx, yy, ww, pw in [(x, y, None, None), (x, y, w, w), (x.bfloat16(), y.bfloat16(), w, None),
                           (x.transpose(1, 3), y.transpose(1, 3), None, w.transpose(1, 3))]:
        go = torch.randn(xx.shape).to(xx.dtype)
        for red in (0, 1, 2):
            args = view4(xx, yy, ww, pw)
            opcheck(torch.ops.fusedloss.bce_fwd.default, (*args, red))
            gargs = view4(go if red == 0 else go[0, 0, 0, 0].expand(go.shape), xx, yy, ww, pw)
            for gi, gt in [(True, False), (False, True), (True, True)]:
                opcheck(torch.ops.fusedloss.bce_bwd.default, (*gargs, red, gi, gt))


def test_opcheck_whole_loss():
    """fusedloss::elementwise_loss (the one-call op with its autograd in C++): BCE (kind 0) and
    Huber / SmoothL1 (kind 1), every reduction, fp64 (gradcheck) and bf16 with an fp32 result."""
    for dtype, out in [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)]:
        x, y = make((3, 4, 5), dtype, "cpu")
        x.requires_grad_(True)
        y = y.clone().requires_grad_(True)
        for red in (0, 1, 2):
            if red == 0 and out != dtype:
                continue  # (the functional takes the general path there)
            for kind, delta, smooth in [(0, 0.0, False), (1, 0.7, False), (1, 0.7, True),
                                        (1, 0.0, True)]:
                opcheck(torch.ops.fusedloss.elementwise_loss.default,
                        (kind, x, y, None, None, delta, smooth, red, out))


def test_retain_graph(backend):
    """Backward re-reads the inputs: any number of backward calls through one graph."""
    x, y = make((4, 5), torch.float32, backend.device)
    x.requires_grad_()
    loss = bce(x, y)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)


def test_compile_fullgraph():
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 6)
    pw = torch.rand(6) + 0.5
    loss_fn = fusedloss.BCEWithLogitsLoss(pos_weight=pw)

    def step(h, t):
        return loss_fn(lin(h), t)

    h, t = torch.randn(16, 8), torch.rand(16, 6)
    assert_compiled_matches_eager(step, (h, t), lin.weight)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reference_backend(monkeypatch, reduction):
    """fusedloss.reference (the fallback without the C++ extension) through the same functional."""
    from fusedloss import _backend
    monkeypatch.setattr(_backend, "_ENV", "reference")
    x, y = make((2, 3, 4), torch.float64, "cpu")
    check(x, y, reduction=reduction, weight=torch.rand(3, 1, dtype=torch.float64),
          pos_weight=torch.rand(4, dtype=torch.float64) * 2)
    x, y = make((5, 6), torch.bfloat16, "cpu")
    check(x, y, reduction=reduction)


def spy_paths(monkeypatch, module, name):
    """Record (CONTIG, GO_SCALAR) of each launch of module.name (a Triton element-wise kernel)."""
    real, seen = getattr(module, name), []

    class Spy:
        arg_names = real.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["CONTIG"], kw["GO_SCALAR"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(module, name, Spy())
    return seen


def test_contiguous_and_strided_paths(monkeypatch):
    """The Triton kernel takes the flat-index path only when every operand is one contiguous run
    (grad_out of a reduced loss: a scalar loaded once), and each path gives torch's values."""
    from fusedloss.kernels import bce as kbce
    monkeypatch.setattr(fusedloss._backend, "_ENV", "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    seen = spy_paths(monkeypatch, kbce, "_bce_kernel")
    x, y = make((6, 10), torch.float32, dev)
    w_full = torch.rand(6, 10, device=dev)
    cases = [  # (inputs and kwargs, expected (CONTIG, GO_SCALAR) of forward then backward)
        ((x, y, None, dict(reduction="none", weight=w_full)), [(True, False), (True, False)]),
        ((x, y, None, dict(reduction="mean")), [(True, False), (True, True)]),
        ((x, y, None, dict(reduction="sum", weight=torch.rand(10, device=dev))),
         [(False, False), (False, True)]),  # broadcast weight: stride 0
        ((x.t(), y.t(), None, {}), [(False, False), (False, True)]),
        # contiguous operands, transposed grad_out: backward strided
        ((x, y, torch.randn(10, 6, device=dev).t(), dict(reduction="none")),
         [(True, False), (False, False)]),
    ]
    for (xx, yy, go, kw), want in cases:
        seen.clear()
        check(xx, yy, grad_out=go, **kw)
        assert seen == want, (kw, seen)


def test_whole_loss_op_strided():
    """fusedloss::elementwise_loss on non-contiguous operands (up to 4 dims read in place with
    their strides, more dims copied) against torch in float64, value and both gradients."""
    for shape, perm in [((3, 4, 5), (2, 0, 1)), ((2, 3, 2, 2, 3), (4, 3, 2, 1, 0))]:
        x0, y0 = make(shape, torch.float64, "cpu")
        x = x0.permute(perm).requires_grad_()
        y = y0.permute(perm).requires_grad_()
        for kind, delta, smooth, ref in [
                (0, 0.0, False, F.binary_cross_entropy_with_logits),
                (1, 0.7, False, lambda a, b, reduction: F.huber_loss(a, b, reduction=reduction,
                                                                     delta=0.7)),
                (1, 0.7, True, lambda a, b, reduction: F.smooth_l1_loss(a, b, reduction=reduction,
                                                                        beta=0.7))]:
            for red, name in [(0, "none"), (1, "mean"), (2, "sum")]:
                got = torch.ops.fusedloss.elementwise_loss(kind, x, y, None, None, delta, smooth, red,
                                                           torch.float64)
                want = ref(x, y, reduction=name)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                go = torch.rand_like(want)
                torch.testing.assert_close(torch.autograd.grad(got, (x, y), go),
                                           torch.autograd.grad(want, (x, y), go),
                                           rtol=1e-12, atol=1e-12)


def test_whole_loss_op_weights():
    """fusedloss::elementwise_loss with broadcast weight / pos_weight (BCE) and a full-shape
    weight (Huber): value and gradients against torch in float64, and opcheck."""
    for shape, wshape, pshape in [((6, 5), (6, 1), (5,)), ((2, 3, 4, 2), (3, 1, 1), (3, 1, 1)),
                                  ((2, 3, 2, 2, 2), (2,), (3, 1, 1, 1))]:
        x, y = make(shape, torch.float64, "cpu")
        x.requires_grad_(True)
        y = y.clone().requires_grad_(True)
        w = torch.rand(wshape, dtype=torch.float64)
        pw = torch.rand(pshape, dtype=torch.float64) + 0.5
        wh = torch.rand(shape, dtype=torch.float64)
        for red, name in [(0, "none"), (1, "mean"), (2, "sum")]:
            for args, want in [
                    ((0, x, y, w, pw, 0.0, False), F.binary_cross_entropy_with_logits(
                        x, y, weight=w, pos_weight=pw, reduction=name)),
                    ((1, x, y, wh, None, 0.7, False), F.huber_loss(
                        x, y, reduction=name, delta=0.7, weight=wh))]:
                got = torch.ops.fusedloss.elementwise_loss(*args, red, torch.float64)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                go = torch.rand_like(want)
                torch.testing.assert_close(torch.autograd.grad(got, (x, y), go),
                                           torch.autograd.grad(want, (x, y), go),
                                           rtol=1e-12, atol=1e-12)
                opcheck(torch.ops.fusedloss.elementwise_loss.default, (*args, red, torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpp_loops_many_chunks(monkeypatch, dtype):
    """The C++ loops past one 4096-element chunk and ending mid-vector, element by element, on
    each path of csrc/elementwise.h: contiguous operands read in place (the lean loop for a scalar
    grad_out, the full loop for a per-element one or weights), a broadcast pos_weight, a
    transposed input and a broadcast target (fp32 buffers); fp16 always through the buffers."""
    monkeypatch.setattr(fusedloss._backend, "_ENV", "cpp")
    n = 3 * 4096 + 37
    x, y = make((n,), dtype, "cpu", seed=1)
    x[:40] = torch.tensor([30.0, -30.0, 90.0, -90.0, 0.0] * 8, dtype=dtype)  # saturated, e = 0
    y[5:10] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5], dtype=dtype)
    check_elementwise_runs(bce, F.binary_cross_entropy_with_logits, x, y)
    g = torch.Generator().manual_seed(2)
    w = torch.rand(n, generator=g).to(dtype)
    check_elementwise_runs(bce, F.binary_cross_entropy_with_logits, x, y, weight=w)
    x2, y2 = make((97, 131), dtype, "cpu", seed=3)
    pw = torch.rand(131, generator=g) * 3
    check_elementwise_runs(bce, F.binary_cross_entropy_with_logits, x2, y2, pos_weight=pw)
    check_elementwise_runs(bce, F.binary_cross_entropy_with_logits, x2.t(), y2.t())
    check_elementwise_runs(bce, F.binary_cross_entropy_with_logits, x2, y2[:1].expand(97, 131))
