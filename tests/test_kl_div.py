"""KL divergence: parity with torch.nn.functional.kl_div in float64 (loss, input and target
gradients), torch's reductions, warning and broadcasting, on every backend."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fusedloss
from fusedloss._elementwise import view4
from fusedloss.functional import kl_div
from conftest import assert_compiled_matches_eager, check_elementwise_runs

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SHAPES = [(), (7,), (5, 6), (2, 3, 4, 5)]
REDUCTIONS = ["none", "batchmean", "sum", "mean"]


def make(shape, dtype, device, log_target=False, yshape=None, seed=0):
    """input log-probabilities (over the last dim) and target probabilities (or their logs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    x = torch.log_softmax(x, -1) if x.dim() else -x.abs()
    y = torch.rand(shape if yshape is None else yshape, generator=g, dtype=torch.float64) + 0.01
    y = y / y.sum(-1, keepdim=True) if y.dim() else y
    y = y.log() if log_target else y
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'mean' warns alike in both
        return fn(*args, **kw)


def check(x, y, grad_out=None, atol=None, grad_target=True, **kw):
    """Loss and input/target gradients of fusedloss vs torch's kl_div in float64."""
    atol = ATOL[x.dtype] if atol is None else atol
    xa, ya = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_(grad_target)
    xr, yr = x.detach().double().requires_grad_(), y.detach().double().requires_grad_(grad_target)
    out = quiet(kl_div, xa, ya, **kw)
    ref = quiet(F.kl_div, xr, yr, **kw)
    assert out.dtype == torch.promote_types(x.dtype, y.dtype) and out.shape == ref.shape
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol * scale, rtol=atol,
                               equal_nan=True)
    # a fixed grad_output (not the global RNG: the result must not depend on test order)
    go = (torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=ref.dtype)
          if grad_out is None else grad_out.double())
    wrt_r, wrt_a = ((xr, yr), (xa, ya)) if grad_target else ((xr,), (xa,))
    gr = torch.autograd.grad(ref, wrt_r, go)
    g = torch.autograd.grad(out, wrt_a, go.to(out.dtype))
    for a, b, t in zip(g, gr, wrt_a):
        assert a.dtype == t.dtype and a.shape == b.shape
        gscale = max(b.nan_to_num().abs().max().item(), 1e-30) if b.numel() else 1.0
        torch.testing.assert_close(a.double(), b, atol=atol * gscale, rtol=atol, equal_nan=True)
    return out, g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("log_target", [False, True])
def test_shapes_dtypes(backend, shape, dtype, log_target):
    x, y = make(shape, dtype, backend.device, log_target)
    for reduction in REDUCTIONS:
        check(x, y, reduction=reduction, log_target=log_target)


@pytest.mark.parametrize("xshape,yshape", [((5, 1), (5,)), ((), (3, 4)), ((3, 4), ()),
                                           ((2, 1, 4, 1), (3, 1, 5)), ((4,), (2, 3, 4))])
@pytest.mark.parametrize("log_target", [False, True])
def test_broadcast(backend, xshape, yshape, log_target):
    """Input and target broadcast as in torch; gradients are summed back to each shape, and
    'batchmean' divides by input.size(0) (not the broadcast shape's), as torch does."""
    x, _ = make(xshape, torch.float32, backend.device)
    _, y = make(yshape, torch.float32, backend.device, log_target, seed=1)
    for reduction in REDUCTIONS:
        check(x, y, reduction=reduction, log_target=log_target)


def test_mixed_dtypes_and_integer_target(backend):
    x, y = make((4, 5), torch.float32, backend.device)
    check(x, y.double(), reduction="sum")  # promoted to fp64, as torch
    check(x.bfloat16(), y, reduction="batchmean")
    yi = torch.randint(0, 3, (4, 5), device=backend.device)
    check(x, yi, reduction="none", grad_target=False)  # integer target: xlogy promotes


def test_zero_targets(backend):
    """Zero targets contribute 0 (torch's xlogy). Where torch multiplies a zero target by an
    infinite log-probability (0 * -inf = NaN) fusedloss gives 0; torch's NaN target gradient at
    y = 0 (the derivative of y log y is -inf there) is kept."""
    d = backend.device
    x = torch.tensor([[-1.0, -2.0, float("-inf"), -0.5, float("-inf")]], dtype=torch.float64,
                     device=d)
    y = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]], dtype=torch.float64, device=d)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = kl_div(xa, ya, reduction="none")
    ref = F.kl_div(x, y, reduction="none")
    expected = torch.where(y == 0, 0.0, ref)
    torch.testing.assert_close(out, expected)
    assert ref[0, 2].isnan()  # torch's 0 * -inf
    gx, gy = torch.autograd.grad(out.sum(), (xa, ya))
    torch.testing.assert_close(gx, -y)
    assert gy[y == 0].isnan().all() and gy[y > 0].isfinite().all()
    # in log space: a zero target is -inf; torch gives NaN for its term and target gradient
    yl = y.log().requires_grad_()
    xa = x.clone().requires_grad_()
    out = kl_div(xa, yl, reduction="sum", log_target=True)
    ref = F.kl_div(x[y > 0], y[y > 0].log(), reduction="sum", log_target=True)
    torch.testing.assert_close(out, ref)
    gx, gy = torch.autograd.grad(out, (xa, yl))
    assert bool((gy[y == 0] == 0).all()) and bool((gx[y == 0] == 0).all())
    assert F.kl_div(x, y.log(), reduction="sum", log_target=True).isnan()


def test_cpu_log_ulps():
    """The C++ log, seen through the per-element loss at input 0 (y log y as the kernel computes
    it), element by element against float64 over all of fp32's positive range, subnormals
    included, and densely near 1: within 2 ulp (plus one subnormal step); 0 -> 0, +inf -> inf,
    negative or NaN -> NaN (at input -1: +inf -> inf). The other KL tests compare sums or values of one scale and would
    pass a log some ulps off."""
    g = torch.Generator().manual_seed(0)
    n = 200000
    e = torch.randint(-149, 121, (n,), generator=g).double()  # (y log y overflows fp32 above)
    y = (torch.rand(n, generator=g, dtype=torch.float64) + 1.0) * 2.0**e / 2
    y[:20000] = 1 + (torch.rand(20000, generator=g, dtype=torch.float64) - 0.5) * 2**-6
    y = torch.cat([y.float(), torch.tensor([0.0, float("inf"), -1.0, -1e-40, float("nan")])])
    x = torch.zeros_like(y)
    x[n + 1] = -1.0  # (y = inf, x = 0 is inf * 0 = NaN, as torch's)
    out = torch.ops.fusedloss.kl_div_fwd(x.view(1, 1, 1, -1), y.view(1, 1, 1, -1), False, 0)
    out = out.view(-1)
    yd = y.double()
    want = yd * yd.log()
    k = n
    assert out[k] == 0 and out[k + 1] == float("inf") and out[k + 2:].isnan().all()
    err = (out[:k].double() - want[:k]).abs() - 2.0**-149
    bad = ~(err <= 2 * 2.0**-23 * want[:k].abs())  # (a NaN is bad)
    assert not bad.any(), (y[:k][bad][:5], (err / want[:k].abs())[bad][:5] / 2.0**-23)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_output(backend, reduction):
    x, y = make((6, 9), torch.float32, backend.device)
    go = (torch.randn(6, 9, device=backend.device) if reduction == "none"
          else torch.tensor(-1.75, device=backend.device))
    check(x, y, grad_out=go, reduction=reduction)


def test_non_contiguous(backend):
    x, y = make((8, 10), torch.float32, backend.device)
    check(x.t(), y.t(), reduction="batchmean")
    check(x[::2, 1::3], y[::2, 1::3], reduction="none", log_target=False)
    check(x, y[:1].expand(8, 10), reduction="sum")


def test_mean_warning_and_legacy_arguments():
    x, y = make((3, 4), torch.float32, "cpu")
    with pytest.warns(UserWarning) as ours:
        kl_div(x, y)
    with pytest.warns(UserWarning) as theirs:
        F.kl_div(x, y)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert [w.category for w in ours] == [w.category for w in theirs]
    assert ours[0].filename == __file__  # points at the caller, as torch's
    for kw in [dict(reduction="batchmean"), dict(reduction="sum"), dict(size_average=False),
               dict(reduce=False), dict(size_average=True)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no 'mean' warning with the legacy arguments
            out = kl_div(x, y, **kw)
        torch.testing.assert_close(out, quiet(F.kl_div, x, y, **kw))


def test_module():
    x, y = make((5, 6), torch.float32, "cpu", log_target=True)
    for kw in [dict(reduction="batchmean", log_target=True), dict(reduction="none"),
               dict(size_average=False, log_target=True), dict(reduce=False)]:
        ours, theirs = fusedloss.KLDivLoss(**kw), quiet(torch.nn.KLDivLoss, **kw)
        assert ours.reduction == theirs.reduction
        yy = y if kw.get("log_target") else y.exp()
        torch.testing.assert_close(ours(x, yy), theirs(x, yy))
    assert "log_target=True" in repr(fusedloss.KLDivLoss(log_target=True))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(target=torch.rand(4, 3)), ValueError, "does not broadcast"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(input=torch.ones(4, 5, dtype=torch.long)), TypeError, "input must be a floating"),
    (dict(target=[0.5]), TypeError, "target must be a torch.Tensor"),
])
def test_bad_input(backend, kwargs, exc, match):
    args = dict(input=torch.randn(4, 5, device=backend.device),
                target=torch.rand(4, 5, device=backend.device))
    args.update({k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
                 for k, v in kwargs.items()})
    with pytest.raises(exc, match=match):
        kl_div(**{"reduction": "sum", **args})


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_gradcheck(backend, reduction, log_target):
    x, y = make((3, 4), torch.float64, backend.device, log_target)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: quiet(kl_div, x, y, reduction=reduction, log_target=log_target), (x, y))


def test_opcheck():
    x, y = make((2, 3, 4, 5), torch.float32, "cpu")
    for xx, yy in [(x, y), (x, y[:, :1].expand(x.shape)), (x.bfloat16(), y.bfloat16()),
                   (x.transpose(1, 3), y.transpose(1, 3))]:
        go = torch.randn(xx.shape).to(xx.dtype)
        for lt in (False, True):
            for red in (0, 1, 2):
                opcheck(torch.ops.fusedloss.kl_div_fwd.default, (*view4(xx, yy), lt, red))
                g = go if red == 0 else go[0, 0, 0, 0].expand(go.shape)
                opcheck(torch.ops.fusedloss.kl_div_bwd.default,
                        (*view4(g, xx, yy), lt, red, True, red == 2))


def test_compile_fullgraph():
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 6)
    loss_fn = fusedloss.KLDivLoss(reduction="batchmean", log_target=True)

    def step(h, t):
        return loss_fn(torch.log_softmax(lin(h), -1), t) + kl_div(
            torch.log_softmax(lin(h), -1), t.exp(), reduction="sum")

    h, t = torch.randn(16, 8), torch.log_softmax(torch.randn(16, 6), -1)
    assert_compiled_matches_eager(step, (h, t), lin.weight)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_backend(monkeypatch, reduction):
    """fusedloss.reference (the fallback without the C++ extension) through the same functional."""
    from fusedloss import _backend
    monkeypatch.setattr(_backend, "_ENV", "reference")
    x, y = make((2, 3, 4), torch.float64, "cpu")
    check(x, y[:1], reduction=reduction)
    x, y = make((5, 6), torch.float16, "cpu", log_target=True)
    check(x, y, reduction=reduction, log_target=True)


def test_whole_loss_op():
    """fusedloss::elementwise_loss kind 2 (KL divergence; the functional's one-call path) for
    every reduction, batchmean (code 3) included, both target forms: value and both gradients
    against torch in float64, opcheck, and a bf16 input with an fp32 result (autocast)."""
    for log_target in (False, True):
        x, y = make((4, 6), torch.float64, "cpu", log_target=log_target)
        x.requires_grad_(True)
        y = y.clone().requires_grad_(True)
        for code, name in [(0, "none"), (1, "mean"), (2, "sum"), (3, "batchmean")]:
            args = (2, x, y, None, None, 0.0, log_target, code, torch.float64)
            got = torch.ops.fusedloss.elementwise_loss(*args)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's 'mean' warning
                want = F.kl_div(x, y, reduction=name, log_target=log_target)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            go = torch.rand_like(want)
            torch.testing.assert_close(torch.autograd.grad(got, (x, y), go),
                                       torch.autograd.grad(want, (x, y), go), rtol=1e-12,
                                       atol=1e-12)
            opcheck(torch.ops.fusedloss.elementwise_loss.default, args)
        xb, yb = x.detach().bfloat16(), y.detach().bfloat16()
        opcheck(torch.ops.fusedloss.elementwise_loss.default,
                (2, xb, yb, None, None, 0.0, log_target, 3, torch.float32))
    with pytest.raises(RuntimeError, match="elementwise_loss"):  # batchmean is KL's only
        torch.ops.fusedloss.elementwise_loss(0, x, y, None, None, 0.0, False, 3, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("log_target", [False, True])
def test_cpp_loops_many_chunks(monkeypatch, dtype, log_target):
    """The C++ loops past one 4096-element chunk and ending mid-vector, element by element:
    contiguous operands read in place (the lean loop for a scalar grad_out, the full loop for a
    per-element one), a transposed input and a broadcast target (fp32 buffers)."""
    monkeypatch.setattr(fusedloss._backend, "_ENV", "cpp")
    ours = lambda a, b, **kw: quiet(kl_div, a, b, log_target=log_target, **kw)  # noqa: E731
    ref = lambda a, b, **kw: quiet(F.kl_div, a, b, log_target=log_target, **kw)  # noqa: E731
    x, y = make((3 * 4096 + 37,), dtype, "cpu", log_target=log_target, seed=1)
    check_elementwise_runs(ours, ref, x, y)
    x2, y2 = make((97, 131), dtype, "cpu", log_target=log_target, seed=3)
    check_elementwise_runs(ours, ref, x2.t(), y2.t())
    check_elementwise_runs(ours, ref, x2, y2[:1].expand(97, 131))
