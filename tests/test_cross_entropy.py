"""Cross-entropy: parity with torch.nn.functional.cross_entropy in float64, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fusedloss
from fusedloss.functional import cross_entropy
from conftest import MARGINS, assert_compiled_matches_eager, assert_rel, confident_rows

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def reference(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              z_loss=0.0):
    """torch's cross-entropy in float64, plus the z-loss term reduced the same way."""
    x = x.double()
    w = None if weight is None else weight.double()
    loss = F.cross_entropy(x, target, weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss and not target.is_floating_point():
        dim = 0 if x.dim() == 1 else 1
        valid = target != ignore_index
        z = torch.where(valid, z_loss * torch.logsumexp(x, dim).square(), 0.0)
        if reduction == "none":
            loss = loss + z
        elif reduction == "sum":
            loss = loss + z.sum()
        else:
            wy = valid.double() if w is None else torch.where(valid, w[target.clamp(min=0)], 0.0)
            loss = loss + z.sum() / wy.sum()
    return loss


def check(x, target, grad_out=None, atol=None, **kw):
    """Loss and input gradient of fusedloss vs the float64 reference."""
    atol = ATOL[x.dtype] if atol is None else atol
    xa = x.detach().clone().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    out = cross_entropy(xa, target, **kw)
    ref = reference(xr, target, **kw)
    assert out.dtype == x.dtype and out.shape == ref.shape
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol * max(1.0, scale), rtol=atol,
                               equal_nan=True)
    go = torch.ones_like(ref) if grad_out is None else grad_out.double()
    (gr,) = torch.autograd.grad(ref, xr, go)
    (g,) = torch.autograd.grad(out, xa, go.to(out.dtype))
    gscale = gr.abs().max().item() if gr.numel() else 1.0
    torch.testing.assert_close(g.double(), gr, atol=atol * max(gscale, 1e-30), rtol=atol)
    return out, g


def randn(*shape, dtype=torch.float32, device="cpu", scale=3.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_maxima_far_from_the_target(backend, dtype):
    """Rows whose later blocks (the C++ kernels sum exp in blocks of 1024 classes against the
    max so far) jump far above the target's logit, or climb block by block: the sums are
    rescaled or redone, never overflow."""
    C = 3000
    x = randn(4, C, dtype=torch.float64)
    x[0, 5] = -100.0                 # target 100 below the rest
    x[1, 2500] = 150.0               # a later block 150 above the target (exp(150) overflows)
    x[2] = torch.linspace(-60, 60, C, dtype=torch.float64)  # the max grows in every block
    x[3, 1024:] -= 80.0              # later blocks far below
    t = torch.tensor([5, 0, 0, 3])
    for reduction in ("none", "mean"):
        check(x.to(dtype).to(backend.device), t.to(backend.device), reduction=reduction)


@pytest.mark.parametrize("V", [33, 1000, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_forward_rows_fp32_exact(V, dtype):
    """The C++ forward's per-row loss and lse come out in fp32 whatever the input dtype: they are
    checked against float64 of the same (rounded) logits at fp32 precision, which the rounded
    half-precision loss returned to users could not show (half and bf16 rows are read in
    place or converted block by block; a lost element would move them by ~1/V)."""
    x = randn(6, V, dtype=dtype)
    t = torch.randint(0, V, (6,))
    loss, lse = torch.ops.fusedloss.cross_entropy_fwd(x.unsqueeze(2), t, None, -100, 0.0, 0.0)
    xd = x.double()
    want_lse = torch.logsumexp(xd, 1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-6, atol=0)
    torch.testing.assert_close(loss.double(), want_lse - xd[torch.arange(6), t], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("V", [33, 1000, 3001])
@pytest.mark.parametrize("smooth", [False, True])
def test_cpu_bf16_backward_rows_match_fp32(V, smooth):
    """bf16 rows' gradient (read and written in place, in blocks, the target skipped) is the fp32
    path's gradient of the same values rounded to bf16, bit for bit: same lse, weights and
    label smoothing given to both backward ops."""
    torch.manual_seed(0)
    n = 6
    x = randn(n, V, dtype=torch.bfloat16)
    t = torch.randint(0, V, (n,))
    t[0], t[1] = 0, V - 1  # the target first and last in its row
    w = torch.rand(V) + 0.5 if smooth else None
    ls = 0.1 if smooth else 0.0
    lse = torch.logsumexp(x.float(), 1)
    scale = torch.rand(n) + 0.5  # one per row, as reduction="none" gives
    args = (t, lse, w, -100, ls, 0.0)
    g16 = torch.ops.fusedloss.cross_entropy_bwd(scale, x.unsqueeze(2), *args)
    g32 = torch.ops.fusedloss.cross_entropy_bwd(scale, x.float().unsqueeze(2), *args)
    assert g16.dtype == torch.bfloat16
    torch.testing.assert_close(g16, g32.to(torch.bfloat16), rtol=0, atol=0)


def test_cpu_softmax_exp_ulps():
    """The C++ exp, seen through the backward op (with grad_scale 1 and no smoothing, the
    gradient of a non-target class is exp(x - lse) as the kernel computes it), element by element
    against float64 exp of the same fp32 differences over all of [-87.3, 0] (fp32's normal
    range), within 2 ulp; -inf logits give exactly 0, NaN stays NaN. The loss and lse tests
    above would pass an exp a dozen ulp off: their rows average the errors away."""
    torch.manual_seed(0)
    n, V = 4, 30000
    d = torch.empty(n, V).uniform_(-87.3, 0.0)
    d[:, 1:200] = torch.empty(n, 199).uniform_(-1.0, 0.0)  # the polynomial's own range, densely
    lse = torch.randn(n) * 20
    x = (d + lse[:, None]).contiguous()
    x[0, 5], x[1, 7] = float("-inf"), float("nan")
    t = torch.zeros(n, dtype=torch.long)
    g = torch.ops.fusedloss.cross_entropy_bwd(torch.ones(()), x.unsqueeze(2), t, lse, None, -100,
                                              0.0, 0.0).squeeze(2)
    want = torch.exp((x - lse[:, None]).double())  # the same fp32 difference, exp in float64
    assert g[0, 5] == 0 and g[1, 7].isnan()
    keep = torch.ones(n, V, dtype=torch.bool)
    keep[:, 0] = False  # the target's p - 1
    keep[0, 5] = keep[1, 7] = False
    err = ((g.double() - want) / want)[keep].abs().max().item()
    assert err <= 2.0 * 2.0**-23, f"exp off by {err / 2.0**-23:.2f} ulp (relative to 2^-23)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spatial", [False, True])
def test_nan_logit_poisons_its_row(backend, dtype, spatial):
    """A NaN logit makes its row's loss and its row's whole gradient NaN, as torch's, and leaves
    the other rows alone (a gradient of zeros or of finite garbage there would pass a GradScaler's
    inf/NaN check and be applied)."""
    x = randn(6, 40, dtype=dtype, device=backend.device)
    x[2, 7] = float("nan")
    t = torch.tensor([0, 5, 3, 2, 39, 7], device=backend.device)
    if spatial:  # the same rows as the pixels of one (1, 40, 6) image
        x, t = x.t().unsqueeze(0), t.unsqueeze(0)
    xa = x.detach().clone().requires_grad_(True)
    out = cross_entropy(xa, t, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), xa)
    xt = x.detach().clone().requires_grad_(True)
    want = F.cross_entropy(xt, t, reduction="none")
    (gt,) = torch.autograd.grad(want.sum(), xt)
    if spatial:
        out, want, g, gt = out[0], want[0], g[0].t(), gt[0].t()
    assert out.isnan().tolist() == want.isnan().tolist() == [False, False, True] + [False] * 3
    assert g.isnan().all(1).tolist() == gt.isnan().all(1).tolist() == [False, False, True] + [False] * 3
    assert not g[[0, 1, 3, 4, 5]].isnan().any()


@pytest.mark.parametrize("V", [2, 7, 1000, 32000, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_vocab_sizes(backend, V, dtype):
    n = 3 if backend.interpreted and V > 1000 else 16
    x = randn(n, V, dtype=dtype, device=backend.device)
    t = torch.randint(0, V, (n,), device=backend.device)
    check(x, t)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 3, -1])
def test_options(backend, reduction, weighted, label_smoothing, ignore_index):
    torch.manual_seed(0)
    n, V = 12, 37
    x = randn(n, V, device=backend.device)
    t = torch.randint(0, V, (n,), device=backend.device)
    t[::4] = ignore_index  # ignore_index may be negative, or a real class (3)
    w = torch.rand(V, device=backend.device) + 0.1 if weighted else None
    check(x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
          label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("z_loss", [1e-3, 0.5])
def test_z_loss(backend, reduction, z_loss):
    x = randn(10, 300, device=backend.device)
    t = torch.randint(0, 300, (10,), device=backend.device)
    t[1] = -100
    check(x, t, reduction=reduction, z_loss=z_loss, label_smoothing=0.1,
          weight=torch.rand(300, device=backend.device))


@pytest.mark.parametrize("shape", [(5,), (4, 6), (2, 6, 3), (2, 6, 3, 2)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_shapes(backend, shape, reduction):
    x = randn(*shape, device=backend.device)
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = torch.randint(0, C, tshape, device=backend.device)
    go = torch.randn(tshape, device=backend.device) if reduction == "none" else None
    check(x, t, grad_out=go, reduction=reduction, weight=torch.rand(C, device=backend.device),
          label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4), (5,)])
def test_probability_targets(backend, shape, reduction):
    x = randn(*shape, device=backend.device)
    dim = 0 if len(shape) == 1 else 1
    t = torch.softmax(torch.randn(*shape, device=backend.device), dim=dim)
    C = shape[dim]
    check(x, t, reduction=reduction, weight=torch.rand(C, device=backend.device),
          label_smoothing=0.15)
    # the gradient also flows to soft targets, as in torch
    ta = t.clone().requires_grad_(True)
    tr = t.double().clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(cross_entropy(x, ta, reduction="sum"), ta)
    (gtr,) = torch.autograd.grad(F.cross_entropy(x.double(), tr, reduction="sum"), tr)
    torch.testing.assert_close(gt.double(), gtr, atol=1e-5, rtol=1e-5)


def test_non_contiguous(backend):
    base = randn(40, 2 * 33, device=backend.device)
    x = base[::2, ::2]  # strided rows and columns
    assert not x.is_contiguous()
    t = torch.randint(0, 33, (20,), device=backend.device)
    check(x, t, label_smoothing=0.1)
    x3 = randn(2, 4, 5, 7, device=backend.device).transpose(2, 3)  # (N, C, d1, d2), permuted
    t3 = torch.randint(0, 7, (2, 4, 5), device=backend.device)
    check(x3.transpose(1, 2), t3, reduction="sum")
    tt = torch.randint(0, 33, (40,), device=backend.device)[::2]  # non-contiguous target
    check(x, tt, reduction="none")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_grad_output(backend, reduction):
    x = randn(9, 50, device=backend.device)
    t = torch.randint(0, 50, (9,), device=backend.device)
    t[0] = -100
    go = torch.randn(9, device=backend.device) if reduction == "none" else torch.tensor(2.5, device=backend.device)
    check(x, t, grad_out=go, reduction=reduction)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_ignored_and_empty(backend, reduction):
    x = randn(4, 9, device=backend.device)
    t = torch.full((4,), -100, device=backend.device)
    out, g = check(x, t, reduction=reduction, label_smoothing=0.1)
    assert torch.all(g == 0)
    if reduction == "mean":
        assert torch.isnan(out)  # as torch: 0 / 0
    e = torch.empty(0, 9, device=backend.device)
    check(e, torch.empty(0, dtype=torch.long, device=backend.device), reduction=reduction)


def test_uint8_target(backend):
    x = randn(6, 11, device=backend.device)
    check(x, torch.randint(0, 11, (6,), device=backend.device).to(torch.uint8))


@pytest.mark.parametrize("margin", MARGINS)
def test_confident_rows_elementwise(backend, margin):
    """Loss and every gradient element of confident rows against a cancellation-free float64
    reference (fusedloss.reference.stable_nll), element by element, for C from 2 to 256k."""
    sizes = [2, 10, 1000, 4096] if backend.interpreted else [2, 3, 10, 1000, 32000, 262144]
    for C in sizes:
        x, t = confident_rows(4 if C > 10000 else 32, C, margin)
        x, t = x.to(backend.device), t.to(backend.device)
        xr = x.double().cpu().requires_grad_(True)
        ref = fusedloss.reference.stable_nll(xr, t.cpu())
        (gr,) = torch.autograd.grad(ref.sum(), xr)
        xa = x.clone().requires_grad_(True)
        out = cross_entropy(xa, t, reduction="none")
        (g,) = torch.autograd.grad(out.sum(), xa)
        assert_rel(out.cpu(), ref.detach(), 1e-4, f"loss, C={C}")
        assert_rel(g.cpu(), gr, 1e-4, f"gradient, C={C}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_lse_exp_ulps(dtype):
    """The C++ exp of the forward's log-sum-exp sums, element by element: a row whose target logit is 0
    and leads every other class by more than 17.5, all -inf but one d, has the loss
    log1p(exp(d)) (rows.h's confident path), exp(d) to 1e-8. Over fp32's (and bf16's) d in
    [-87.33, -17.5], at every position of 64 classes: within 2 ulp of float64. (The loss tests
    compare at 1e-4 or sums and would pass an exp some ulps off; test_cpu_softmax_exp_ulps
    checks the backward's.)"""
    g = torch.Generator().manual_seed(0)
    n, C = 100000, 65
    lo = -87.33 if dtype == torch.float32 else -87.0  # (bf16's neighbours: -87.5, -87.0)
    d = (torch.rand(n, generator=g, dtype=torch.float64) * (-17.5 - lo) + lo).to(dtype)
    x = torch.full((n, C), float("-inf"), dtype=dtype)
    x[:, 0] = 0
    x[torch.arange(n), torch.randint(1, C, (n,), generator=g)] = d
    loss, _ = torch.ops.fusedloss.cross_entropy_fwd(
        x.view(n, C, 1), torch.zeros(n, dtype=torch.long), None, -100, 0.0, 0.0)
    want = d.double().exp().log1p()
    err = (loss.double() - want).abs()
    bad = ~(err <= 2 * 2.0**-23 * want)  # (a NaN is bad)
    assert not bad.any(), (d[bad][:5], (err / want)[bad][:5] / 2.0**-23)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n, C", [(256, 16384), (20000, 201)])
def test_cpu_bf16_gradient_rounding(label_smoothing, n, C):
    """The bf16 gradient, computed in fp32 from bf16 rows read in place, is that fp32 gradient
    rounded as torch's .to(bfloat16) rounds (to nearest, ties to even), bit for bit (NaN: NaN;
    torch's vectorised conversion gives 0xFFFF, its scalar one 0x7FC0, ours 0x7FC0):
    the same backward over the same logits in fp32, given the same lse, then rounded by torch.
    4M elements give ~50 exact ties; the tolerance-based tests would pass any rounding. Long
    rows and the row sweeps' short ones (201 classes: an odd overlapping last step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, generator=g).bfloat16()
    x[3, 100] = float("nan")
    t = torch.randint(0, C, (n,), generator=g)
    args = (t, None, -100, label_smoothing, 0.0)
    _, lse = torch.ops.fusedloss.cross_entropy_fwd(x.view(n, C, 1), *args)
    # A NaN and a +inf logit under a finite lse (the kernels' NaN-free rounding): NaN there only
    x[7, 200], x[9, C - 1] = float("nan"), float("inf")
    scale = torch.rand(n, generator=g) + 0.5
    ours = torch.ops.fusedloss.cross_entropy_bwd(scale, x.view(n, C, 1), t, lse, *args[1:])
    fp32 = torch.ops.fusedloss.cross_entropy_bwd(scale, x.float().view(n, C, 1), t, lse, *args[1:])
    assert ours.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert ((fp32.view(torch.int32) & 0xFFFF) == 0x8000).sum() > 10  # ties are exercised
    want = fp32.bfloat16()
    assert ours.view(n, C)[3].isnan().all()
    # (and at the target, whose gradient sums the row's p)
    nan = ours.view(n, C).isnan()
    assert nan.sum() == C + 4 and nan[7, 200] and nan[9, C - 1] and nan[7, t[7]] and nan[9, t[9]]
    bad = (ours.view(torch.int16) != want.view(torch.int16)) & ~(ours.isnan() & want.isnan())
    assert not bad.any(), (ours[bad][:5], fp32[bad][:5])


def test_confident_bf16_no_worse_than_torch(backend):
    """True-class probability near 1 in bf16: error vs float64 no worse than torch's own bf16."""
    torch.manual_seed(0)
    n, V = 16, 1000
    x = randn(n, V, device=backend.device, scale=1.0)
    t = torch.randint(0, V, (n,), device=backend.device)
    x[torch.arange(n), t] = 14.0  # p_y ~ 1 - 1e-3 .. 1 - 1e-4
    xb = x.to(torch.bfloat16)
    for red in ["none", "sum"]:
        ref = reference(xb.double().requires_grad_(True), t, reduction=red)
        xa = xb.clone().requires_grad_(True)
        xt = xb.clone().requires_grad_(True)
        ours, theirs = cross_entropy(xa, t, reduction=red), F.cross_entropy(xt, t, reduction=red)
        assert (ours.double() - ref).abs().max() <= (theirs.double() - ref).abs().max() + 1e-12
        xr = xb.double().requires_grad_(True)
        (gr,) = torch.autograd.grad(reference(xr, t, reduction=red).sum(), xr)
        (g,) = torch.autograd.grad(ours.sum(), xa)
        (gt,) = torch.autograd.grad(theirs.sum(), xt)
        assert (g.double() - gr).abs().max() <= (gt.double() - gr).abs().max() + 1e-12


def test_extreme_logits_finite(backend):
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e38, 1e38, 0.0], [0.0, 0.0, 0.0]], device=backend.device)
    t = torch.tensor([0, 0, 2], device=backend.device)
    check(x, t, reduction="none")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck(backend, reduction):
    x = randn(3, 5, 2, dtype=torch.float64, device=backend.device).requires_grad_(True)
    t = torch.randint(0, 5, (3, 2), device=backend.device)
    t[0, 0] = -100
    w = torch.rand(5, dtype=torch.float64, device=backend.device)
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.25,
                                z_loss=0.125), (x,))


def test_inplace_backward(backend):
    x = randn(8, 40, device=backend.device).requires_grad_(True)
    t = torch.randint(0, 40, (8,), device=backend.device)
    t[2] = -100
    (gr,) = torch.autograd.grad(cross_entropy(x, t, label_smoothing=0.1), x)
    logits = x * 1.0  # a non-leaf, like the output of an LM head
    ptr = logits.data_ptr()
    loss = cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(x.grad, gr, atol=1e-6, rtol=1e-5)
    assert logits.data_ptr() == ptr  # the gradient was written over the logits
    # anything that saved the logits for its own backward now raises instead of going wrong
    y = x.exp()
    loss = cross_entropy(y, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="leaf"):
        cross_entropy(x, t, inplace_backward=True)


def test_retain_graph():
    """Backward twice through the same graph gives the same gradient; with inplace_backward the
    second backward raises instead (its buffer was scaled in place)."""
    x = randn(4, 10).requires_grad_(True)
    t = torch.randint(0, 10, (4,))
    loss = cross_entropy(x, t)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(2.0))
    torch.testing.assert_close(g2, 2 * g1)
    loss = cross_entropy(x * 1.0, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(target=torch.tensor([0, 1, 7, 2])), IndexError, "target 7 is out of bounds"),
        (dict(target=torch.tensor([0, 1, -5, 2])), IndexError, "target -5 is out of bounds"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape"),
        (dict(target=torch.tensor([0, 1, 2, 3]).int()), TypeError, "target must hold int64"),
        (dict(target=torch.rand(4, 3)), ValueError, "probability target"),
        (dict(weight=torch.rand(4)), ValueError, "weight must have shape"),
        (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, "weight must be a floating"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(input=torch.tensor(1.0)), ValueError, "input must have shape"),
        (dict(input=torch.ones(4, 5, dtype=torch.long)), TypeError, "input must be a floating"),
    ],
)
def test_bad_input(backend, kwargs, exc, match):
    if exc is IndexError and backend.device.type == "cuda":
        pytest.skip("on CUDA a bad target trips a device-side assert: test_checks.py")
    args = dict(input=randn(4, 5, device=backend.device),
                target=torch.tensor([0, 1, 2, 3], device=backend.device))
    args.update({k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
                 for k, v in kwargs.items()})
    with pytest.raises(exc, match=match):
        cross_entropy(**args)


def test_module_matches_torch():
    w = torch.rand(7)
    ours = fusedloss.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    x, t = randn(10, 7), torch.randint(0, 7, (10,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert "label_smoothing=0.1" in repr(ours)
    # legacy size_average / reduce, as torch
    legacy = fusedloss.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    torch.testing.assert_close(legacy(x, t), F.cross_entropy(x, t, reduction="sum"))
    assert set(dict(ours.named_buffers())) == {"weight"}  # moves with .to(device)


def test_opcheck():
    x = randn(5, 13, 2)
    t = torch.randint(0, 13, (10,))
    t[3] = -100
    w = torch.rand(13)
    for xx, ww, eps, z in [(x, None, 0.0, 0.0), (x, w, 0.1, 1e-3), (x.bfloat16(), None, 0.0, 0.0),
                           (x.transpose(0, 2), w, 0.2, 0.0)]:
        opcheck(torch.ops.fusedloss.cross_entropy_fwd.default, (xx, t, ww, -100, eps, z))
        _, lse = torch.ops.fusedloss.cross_entropy_fwd(xx, t, ww, -100, eps, z)
        for scale in [torch.tensor([0.5]), torch.randn(10)]:
            args = (scale, xx, t, lse, ww, -100, eps, z)
            opcheck(torch.ops.fusedloss.cross_entropy_bwd.default, args)
            opcheck(torch.ops.fusedloss.cross_entropy_bwd_inplace.default,
                    (scale, xx.clone(), t, lse, ww, -100, eps, z))


def test_opcheck_whole_loss():
    """fusedloss::cross_entropy (the one-call op with its autograd in C++) for every reduction,
    weights, smoothing, z-loss, fp64 (gradcheck) and bf16 under an fp32 out_dtype (autocast)."""
    t = torch.randint(0, 13, (5, 2))
    t[1, 0] = -100
    w = torch.rand(13, dtype=torch.float64)
    for dtype, out in [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)]:
        x = randn(5, 13, 2, dtype=dtype).requires_grad_(True)
        for red in (0, 1, 2):
            for ww, eps, z in [(None, 0.0, 0.0), (w, 0.1, 1e-3)]:
                opcheck(torch.ops.fusedloss.cross_entropy.default,
                        (x, t, ww, red, -100, eps, z, out))


@pytest.mark.parametrize("direct", [True, False])
def test_whole_loss_op_is_the_cpu_path(monkeypatch, direct):
    """On the C++ backend cross_entropy is one call: of the op's autograd kernel directly
    (csrc/python.cpp) in plain eager calls, else of fusedloss::cross_entropy; its backward matches
    the float64 reference either way (so a regression to the Python path is visible)."""
    monkeypatch.setattr(fusedloss._backend, "_ENV", "cpp")
    calls = {"direct": 0, "op": 0}
    op, fast = fusedloss.cross_entropy._whole_op, fusedloss.cross_entropy._direct
    monkeypatch.setattr(fusedloss.cross_entropy, "_whole_op",
                        lambda *a: calls.__setitem__("op", calls["op"] + 1) or op(*a))
    monkeypatch.setattr(fusedloss.cross_entropy, "_direct",
                        lambda *a: calls.__setitem__("direct", calls["direct"] + 1) or fast(*a)
                        if direct else None)
    x = randn(6, 5)
    t = torch.tensor([0, 4, -100, 2, 3, 1])
    w = torch.rand(5)
    for red in ("mean", "sum", "none"):
        check(x, t, weight=w, reduction=red, label_smoothing=0.1,
              grad_out=torch.rand(6) if red == "none" else None)
    assert calls == ({"direct": 3, "op": 0} if direct else {"direct": 0, "op": 3})


def _direct_cross_entropy(x, t, w=None, reduction="mean", ignore_index=-100, eps=0.0, z=0.0):
    return fusedloss._backend.C_MODULE.cross_entropy(x, t, w, reduction, ignore_index, eps, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_direct_call_is_the_op(dtype):
    """The direct call (the op's autograd kernel without the dispatcher) returns what
    fusedloss::cross_entropy returns, loss and gradient bit for bit, for every reduction and option,
    grad or no grad."""
    op = torch.ops.fusedloss.cross_entropy.default
    t = torch.randint(0, 13, (5, 2))
    t[1, 0] = 7
    w = torch.rand(13, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for red, code in [("none", 0), ("mean", 1), ("sum", 2)]:
        for ww, eps, z, ii in [(None, 0.0, 0.0, -100), (w, 0.1, 1e-3, 7), (None, 0, 1, 7)]:
            x = randn(5, 13, 2, dtype=dtype).requires_grad_()
            ours = _direct_cross_entropy(x, t, ww, red, ii, eps, z)
            want = op(x, t, ww, code, ii, float(eps), float(z), dtype)
            assert ours is not None and ours.dtype == want.dtype and torch.equal(ours, want)
            go = torch.rand_like(want)
            (g,) = torch.autograd.grad(ours, x, go)
            (gw,) = torch.autograd.grad(want, x, go)
            assert torch.equal(g, gw)
            with torch.no_grad():
                assert _direct_cross_entropy(x, t, ww, red, ii, eps, z).grad_fn is None
    with pytest.raises(IndexError, match="out of bounds"):
        _direct_cross_entropy(randn(4, 5), torch.tensor([0, 1, 5, 2]))


def test_compile_fullgraph():
    torch._dynamo.reset()
    lin = torch.nn.Linear(16, 300)
    loss_fn = fusedloss.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)

    def step(h, t):
        return loss_fn(lin(h), t)

    h, t = torch.randn(32, 16), torch.randint(0, 300, (32,))
    t[0] = -100
    assert_compiled_matches_eager(step, (h, t), lin.weight)
    # inplace_backward is ignored (not an error) under compile
    compiled2 = torch.compile(lambda h, t: fusedloss.functional.cross_entropy(
        lin(h), t, inplace_backward=True), fullgraph=True)
    (g2,) = torch.autograd.grad(compiled2(h, t), lin.weight)
    (g2e,) = torch.autograd.grad(F.cross_entropy(lin(h), t), lin.weight)
    torch.testing.assert_close(g2, g2e)


@pytest.mark.parametrize("V", [262144, 300007])
def test_huge_vocab(backend, V):
    """Beyond 2^18 classes, with a tail that is not a multiple of any block size."""
    x = randn(2, V, device=backend.device)
    t = torch.tensor([V - 1, 0], device=backend.device)
    check(x, t, label_smoothing=0.1)


def test_int64_offsets(backend):
    """More than 2^31 logits: the last rows are addressed past 32-bit offsets."""
    if backend.interpreted:
        pytest.skip("2^31 elements are too many for the Triton interpreter; covered by cpp and CUDA")
    n, V = 8193, 262144  # 2.15e9 bf16 elements (4.3 GB)
    x = torch.zeros(n, V, dtype=torch.bfloat16, device=backend.device)
    x[-1, 7] = 10.0
    t = torch.zeros(n, dtype=torch.long, device=backend.device)
    t[-1] = 7
    loss = cross_entropy(x, t, reduction="none")
    lse_zero = torch.log(torch.tensor(float(V), dtype=torch.float64))
    lse_last = torch.logsumexp(torch.tensor([10.0] + [0.0], dtype=torch.float64)
                               + torch.log(torch.tensor([1.0, V - 1.0], dtype=torch.float64)), 0)
    expected = torch.full((n,), lse_zero.item(), dtype=torch.float64)
    expected[-1] = lse_last - 10.0
    torch.testing.assert_close(loss.double().cpu(), expected, atol=0, rtol=8e-3)  # bf16 output
    del x


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reference_backend(monkeypatch, reduction):
    """The plain-PyTorch fallback (used when the C++ extension is not built) is a full backend."""
    from fusedloss import _backend

    monkeypatch.setattr(_backend, "_ENV", "reference")
    x = randn(6, 11, 3)
    t = torch.randint(0, 11, (6, 3))
    t[0, 1] = -100
    go = torch.randn(6, 3) if reduction == "none" else None
    check(x, t, grad_out=go, reduction=reduction, weight=torch.rand(11), label_smoothing=0.1,
          z_loss=1e-3)
    with pytest.raises(IndexError, match="out of bounds"):
        cross_entropy(x, torch.full((6, 3), 11))
    logits = x.clone().requires_grad_(True) * 1.0
    cross_entropy(logits, t, inplace_backward=True).backward()  # writes into the logits


@pytest.mark.parametrize("weighted", [False, True])
def test_fp64_options_exact(backend, weighted):
    """label_smoothing, z_loss reach the kernels as fp64: a float64 loss within a few ulps of
    torch's float64 (as fp32 they were off by ~1e-8 relative)."""
    d = backend.device
    x = randn(6, 11, dtype=torch.float64, device=d)
    t = torch.randint(0, 11, (6,), device=d)
    w = torch.rand(11, dtype=torch.float64, device=d) + 0.5 if weighted else None
    out = cross_entropy(x, t, weight=w, reduction="none", label_smoothing=0.1)
    ref = F.cross_entropy(x, t, weight=w, reduction="none", label_smoothing=0.1)
    assert_rel(out.cpu(), ref.cpu(), 2e-15, "fp64 loss, label_smoothing=0.1")
    out = cross_entropy(x, t, reduction="none", z_loss=0.1)
    ref = F.cross_entropy(x, t, reduction="none") + 0.1 * torch.logsumexp(x, 1).square()
    assert_rel(out.cpu(), ref.cpu(), 2e-15, "fp64 loss, z_loss=0.1")


@pytest.mark.parametrize("value", [5, -1, 7, -5])
@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3)])
def test_target_out_of_range(backend, value, shape):
    """A class index equal to C, or -1 when ignore_index is not -1 (the edge cases an off-by-one
    in the check lets through), raises IndexError naming it. On CUDA the check is a device-side
    assertion instead (tests/test_checks.py)."""
    if backend.device.type == "cuda":
        pytest.skip("on CUDA a bad target trips a device-side assert: test_checks.py")
    x = randn(*shape, device=backend.device)
    t = torch.zeros((shape[0],) + shape[2:], dtype=torch.long, device=backend.device)
    t.view(-1)[-1] = value
    with pytest.raises(IndexError, match=f"target {value} is out of bounds for 5 classes"):
        cross_entropy(x, t)
    with pytest.raises(IndexError, match=f"target {value} is out of bounds"):
        cross_entropy(x, t, label_smoothing=0.1, reduction="none")
    cross_entropy(x, t, ignore_index=value)  # ignored: no error


@pytest.mark.parametrize("path", ["rows", "row"])
def test_rows_per_program_paths(monkeypatch, path):
    """Triton: small C runs several rows per program ([ROWS, BLOCK] tiles, with a partial last
    tile), wide C one row per program; both give the reference on every option, with per-row and
    scalar grad_output, (N, C, d) inputs and in-place backward. Each run is made to take `path`:
    the other path's kernels raise if launched."""
    from fusedloss.kernels import _common, cross_entropy as kce
    monkeypatch.setattr(fusedloss._backend, "_ENV", "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError(f"the {path} path launched the other path's kernel")

    if path == "row":
        monkeypatch.setattr(_common, "ROWS_MAX_C", 0)
        names = ["_cross_entropy_fwd_rows_kernel", "_cross_entropy_bwd_rows_kernel"]
    else:
        names = ["_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel"]
    for name in names:
        monkeypatch.setattr(kce, name, Forbidden())
    torch.manual_seed(0)
    for n, C in [(37, 10), (70, 100), (5, 1), (3, 2048)]:  # partial last tiles
        x = randn(n, C, device=dev)
        t = torch.randint(0, C, (n,), device=dev)
        t[1] = -100
        w = torch.rand(C, device=dev)
        for kw in [{}, dict(weight=w, label_smoothing=0.2, z_loss=1e-2),
                   dict(label_smoothing=0.1, reduction="sum"), dict(weight=w, reduction="none")]:
            go = torch.randn(n, device=dev) if kw.get("reduction") == "none" else None
            check(x, t, grad_out=go, **kw)
    x3, t3 = randn(3, 7, 5, device=dev), torch.randint(0, 7, (3, 5), device=dev)
    check(x3.transpose(0, 2).contiguous().transpose(0, 2), t3, reduction="none",
          grad_out=torch.randn(3, 5, device=dev), weight=torch.rand(7, device=dev),
          label_smoothing=0.3)
    xa = randn(40, 33, device=dev).requires_grad_(True)
    t = torch.randint(0, 33, (40,), device=dev)
    (gr,) = torch.autograd.grad(cross_entropy(xa, t, label_smoothing=0.1), xa)
    logits = xa * 1.0
    cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=True).backward()
    torch.testing.assert_close(xa.grad, gr, atol=1e-6, rtol=1e-5)


def test_whole_loss_op_graph_rules():
    """The C++ autograd node of fusedloss::cross_entropy follows autograd's rules: retain_graph
    gives the same gradient twice, a second backward without it raises, so does a backward after
    the logits were modified in place, and under no_grad no graph is built."""
    x = randn(6, 5).requires_grad_()
    t = torch.tensor([0, 4, -100, 2, 3, 1])
    loss = cross_entropy(x, t)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, x)
    h = x * 1.0
    loss = cross_entropy(h, t)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.no_grad():
        assert cross_entropy(x, t).grad_fn is None


def test_whole_loss_op_checks_its_arguments():
    """Called directly, the one-call op rejects what the functional would (a target of the right
    size but the wrong shape would otherwise be read as other rows)."""
    op = torch.ops.fusedloss.cross_entropy.default
    x = randn(4, 3, 5)
    for args in [(x, torch.zeros(5, 4, dtype=torch.long), None, 1, -100, 0.0, 0.0),
                 (x, torch.zeros(4, 5), None, 1, -100, 0.0, 0.0),
                 (x, torch.zeros(4, 5, dtype=torch.long), torch.ones(4), 1, -100, 0.0, 0.0),
                 (x, torch.zeros(4, 5, dtype=torch.long), None, 3, -100, 0.0, 0.0),
                 (x, torch.zeros(4, 5, dtype=torch.long), None, 1, -100, 1.5, 0.0),
                 (x, torch.zeros(4, 5, dtype=torch.long), None, 1, -100, 0.0, -1.0)]:
        with pytest.raises(RuntimeError, match="fusedloss::cross_entropy"):
            op(*args, torch.float32)


@pytest.mark.parametrize("layout", ["rows", "pixels", "strided"])
@pytest.mark.parametrize("C", [3, 64, 65, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_and_rows(layout, C, dtype):
    """The C++ kernels' layouts: tiles of rows swept class by class (one lane per row) for
    unit-stride pixels and (N, C) rows of few classes, row by row for contiguous (N, C) rows
    (C = 64, 65, 200; bf16 with weights and smoothing: the gradient class by class), and rows
    one at a time otherwise (strided classes: through the row buffer at 65, its forward at
    200): all against float64 with every option on, more rows than one tile (256) so that
    tiles end mid-way, a per-row grad_output, ignored rows, and the in-place backward."""
    n = 300 if layout == "rows" else 2
    shape = (n, C) if layout == "rows" else (n, C, 150)
    x = randn(*shape, dtype=dtype)
    if layout == "strided":  # spatial stride C: the row path
        x = randn(n, 150, C, dtype=dtype).transpose(1, 2)
    tshape = (n,) if layout == "rows" else (n, 150)
    t = torch.randint(0, C, tshape)
    t.view(-1)[::7] = -100
    w = torch.rand(C) + 0.5
    for kw in [dict(), dict(weight=w, label_smoothing=0.2, z_loss=1e-2)]:
        check(x, t, grad_out=torch.rand(tshape), reduction="none", atol=2e-2 if dtype ==
              torch.bfloat16 else None, **kw)
        check(x, t, reduction="mean", atol=2e-2 if dtype == torch.bfloat16 else None, **kw)
    h = x.double().requires_grad_()
    ref = F.cross_entropy(h, t, weight=w.double(), label_smoothing=0.2)
    (gr,) = torch.autograd.grad(ref, h)
    xi = x.clone().requires_grad_()
    xx = xi * 1  # not a leaf: its memory receives the gradient
    cross_entropy(xx, t, weight=w, label_smoothing=0.2, inplace_backward=True).backward()
    torch.testing.assert_close(xx.detach().double(), gr, atol=2e-2 if dtype == torch.bfloat16
                               else 1e-6, rtol=0)


@pytest.mark.parametrize("C", [32, 33, 47, 100, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sweeps(C, dtype):
    """Contiguous (N, C) fp32 and bf16 rows of 32 to 768 classes take the C++ row sweeps
    (rows.h): steps of 2W classes from the row's start, then a last step that ends at the row's
    end and overlaps the one before. Against float64: the target at every class (those of the
    overlap and the last step included), a per-row grad_output, ignored rows, label smoothing
    and z-loss, rows sC = C + 7 apart, and the in-place backward (the overlapping step read
    before the steps before it write over part of it)."""
    n = 2 * C + 5
    x = randn(n, C + 7, dtype=dtype)[:, :C]  # rows C + 7 apart
    t = torch.cat([torch.arange(C), torch.arange(C).flip(0), torch.full((5,), -100)])
    atol = 2e-2 if dtype == torch.bfloat16 else None
    for kw in [dict(), dict(label_smoothing=0.3, z_loss=1e-3)]:
        check(x, t, grad_out=torch.rand(n), reduction="none", atol=atol, **kw)
        check(x.contiguous(), t, reduction="mean", atol=atol, **kw)
    h = x.double().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(h, t, label_smoothing=0.3), h)
    xx = x.contiguous().requires_grad_() * 1  # not a leaf: its memory receives the gradient
    cross_entropy(xx, t, label_smoothing=0.3, inplace_backward=True).backward()
    torch.testing.assert_close(xx.detach().double(), gr, atol=atol or 1e-6, rtol=0)
    xo = x.contiguous().requires_grad_()
    (go,) = torch.autograd.grad(cross_entropy(xo, t, label_smoothing=0.3), xo)
    assert torch.equal(xx.detach(), go)  # in place, the same bits as into a new buffer


def test_gradient_buffer_reuse():
    """A freed logits-sized (>= 8 MiB) gradient's memory is kept and reused by the next backward
    (no page faults on fresh memory); the reused buffer's old values never leak into the new
    gradient (ignored rows included), and release_buffers() frees what is kept."""
    fusedloss.release_buffers()
    x = randn(64, 40000)  # 10 MiB of fp32
    t = torch.randint(0, 40000, (64,))
    t2 = t.clone()
    t2[::3] = -100
    xa = x.clone().requires_grad_()
    cross_entropy(xa, t, label_smoothing=0.5).backward()
    del xa  # its gradient is freed: the buffer is kept
    xa = x.clone().requires_grad_()
    cross_entropy(xa, t2).backward()
    assert fusedloss.release_buffers() == 0  # the kept buffer is the new gradient's
    xr = x.double().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.cross_entropy(xr, t2), xr)
    torch.testing.assert_close(xa.grad.double(), g_ref, atol=1e-9, rtol=1e-5)
    assert (xa.grad[::3] == 0).all()
    del xa
    assert fusedloss.release_buffers() == x.numel() * 4  # the last one freed is kept
    assert fusedloss.release_buffers() == 0


def _only_kernels(monkeypatch, module, keep):
    """Make every launch of module's _*_kernel other than those in `keep` raise, so that a run
    is known to take the path under test."""

    class Forbidden:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            raise AssertionError(f"launched {self.name}, not one of {sorted(keep)}")

    for name in dir(module):
        if name.startswith("_") and name.endswith("_kernel") and name not in keep:
            monkeypatch.setattr(module, name, Forbidden(name))


def test_spatial_tiles(monkeypatch):
    """Triton, (N, C, H, W) with contiguous pixels: BLOCK_D pixels per program sweeping the
    classes (kernels/cross_entropy.py's tile kernels, nothing else), with partial pixel tiles,
    several class blocks, ignored pixels, every option, per-pixel grad_output and in-place
    backward; confident pixels element by element."""
    from fusedloss.kernels import cross_entropy as kce
    monkeypatch.setattr(fusedloss._backend, "_ENV", "triton")
    _only_kernels(monkeypatch, kce, {"_cross_entropy_fwd_tile_kernel",
                                     "_cross_entropy_bwd_tile_kernel", "_scale_kernel"})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in [(2, 5, 4, 4), (1, 40, 130)]:  # C = 40: two class blocks; D = 130: a tail
        C = shape[1]
        x = randn(*shape, device=dev)
        t = torch.randint(0, C, shape[:1] + shape[2:], device=dev)
        t.view(-1)[[1, 7]] = -100
        w = torch.rand(C, device=dev)
        for kw in [{}, dict(weight=w, label_smoothing=0.2, z_loss=1e-2),
                   dict(label_smoothing=0.1, reduction="sum"), dict(weight=w, reduction="none")]:
            go = torch.randn(t.shape, device=dev) if kw.get("reduction") == "none" else None
            check(x, t, grad_out=go, **kw)
        xa = x.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(cross_entropy(xa, t, weight=w, label_smoothing=0.1), xa)
        for reduction in ("mean", "none"):  # the one-read scheme and the recompute one
            xb = x.clone().requires_grad_(True)
            logits = xb * 1.0
            loss = cross_entropy(logits, t, weight=w, label_smoothing=0.1, reduction=reduction,
                                 inplace_backward=True)
            (loss if reduction == "mean" else loss.sum() / w[t.clamp(min=0)][t >= 0].sum()
             ).backward()
            torch.testing.assert_close(xb.grad, gr, atol=1e-6, rtol=1e-5)
    # confident pixels: the rows of confident_rows as the pixels of one (1, C, 32) image
    for C in (10, 1000):
        x, t = confident_rows(32, C, 30.0)
        x, t = x.to(dev), t.to(dev)
        xr = x.double().cpu().requires_grad_(True)
        ref = fusedloss.reference.stable_nll(xr, t.cpu())
        (gr,) = torch.autograd.grad(ref.sum(), xr)
        xa = x.t().contiguous()[None].requires_grad_(True)
        out = cross_entropy(xa, t[None], reduction="none")
        (g,) = torch.autograd.grad(out.sum(), xa)
        assert_rel(out[0].cpu(), ref.detach(), 1e-4, f"loss, C={C}")
        assert_rel(g[0].t().cpu(), gr, 1e-4, f"gradient, C={C}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_read_inplace_backward(monkeypatch, dtype):
    """Triton, inplace_backward with 'mean' / 'sum': forward already leaves the gradient for
    grad_output = 1 in the logits (the one-read scheme); backward scales it by any other
    grad_output; a second backward (retain_graph) and any other backward that saved the logits
    raise; under no_grad nothing is written; 'none', and the C++ backend, keep the recompute
    scheme (logits untouched until backward)."""
    monkeypatch.setattr(fusedloss._backend, "_ENV", "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    atol = ATOL[dtype]
    for shape in [(6, 40), (2, 5, 4, 4)]:  # rows and spatial tiles
        C = shape[1]
        x = randn(*shape, device=dev, dtype=dtype)
        t = torch.randint(0, C, shape[:1] + shape[2:], device=dev)
        t.view(-1)[2] = -100
        w = torch.rand(C, device=dev)
        for reduction, go in [("mean", None), ("sum", None), ("mean", 2.5), ("sum", 0.0)]:
            kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-2, reduction=reduction)
            xr = x.detach().double().requires_grad_(True)
            ref = reference(xr, t, **kw)
            (g1,) = torch.autograd.grad(ref, xr)
            xa = x.clone().requires_grad_(True)
            logits = xa * 1.0
            loss = cross_entropy(logits, t, inplace_backward=True, **kw)
            torch.testing.assert_close(loss.double(), ref.detach(), atol=atol, rtol=atol)
            # the gradient for grad_output = 1 is in the logits before backward
            torch.testing.assert_close(logits.detach().double(), g1, atol=atol, rtol=atol)
            loss.backward(None if go is None else torch.tensor(go, dtype=dtype, device=dev),
                          retain_graph=True)
            torch.testing.assert_close(xa.grad.double(), g1 * (1.0 if go is None else go),
                                       atol=atol, rtol=atol)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
    x = randn(6, 40, device=dev)
    t = torch.randint(0, 40, (6,), device=dev)
    y = x.requires_grad_(True).exp()  # exp saves its output, the logits here
    cross_entropy(y, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    for env, reduction, grad_mode in [("triton", "none", True), ("cpp", "mean", True),
                                      ("triton", "mean", False)]:
        monkeypatch.setattr(fusedloss._backend, "_ENV", env)
        logits = x * 1.0
        before = logits.detach().clone()
        with torch.set_grad_enabled(grad_mode):
            cross_entropy(logits, t, inplace_backward=True, reduction=reduction)
        assert torch.equal(logits.detach(), before), (env, reduction, grad_mode)
