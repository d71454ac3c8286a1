"""Focal losses: parity with the torchvision formula and float64 references, on every backend.

torchvision is not a dependency: its sigmoid_focal_loss formula is written out (in fusedloss.reference)
and evaluated in float64 by autograd. For the extreme-logit grid, where that formula loses 1 - p_t
to rounding, the references compute 1 - p_t (sigmoid) and log p_t (softmax) without cancellation
and are differentiated by autograd in float64, independently of the kernels' closed forms.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fusedloss
from fusedloss import _backend
from fusedloss.functional import cross_entropy, sigmoid_focal_loss, softmax_focal_loss
from fusedloss.reference import torchvision_sigmoid_focal_loss
from conftest import MARGINS, assert_compiled_matches_eager, assert_rel, confident_rows

RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
GRID = [1e-3, 5.0, 17.0, 20.0, 60.0, 110.0]
GRID = sorted(GRID + [-v for v in GRID])
GAMMAS = [0.0, 0.5, 1.0, 2.0, 3.5]


def tv_sigmoid(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, written out (fusedloss.reference), with its reductions."""
    loss = torchvision_sigmoid_focal_loss(inputs, targets, alpha, gamma)
    return {"none": loss, "mean": loss.mean() if loss.numel() else loss.sum() / 0,
            "sum": loss.sum()}[reduction]


def stable_sigmoid(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """The same loss with 1 - p_t = y sigmoid(-x) + (1 - y) sigmoid(x): float64, no cancellation."""
    q = targets * torch.sigmoid(-inputs) + (1 - targets) * torch.sigmoid(inputs)
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none") * q ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def stable_softmax(x, t, gamma, alpha=None, ignore_index=-100, reduction="mean"):
    """Softmax focal loss in float64 over (N, C) rows; log p_t = -log1p(sum_j!=t exp(x_j - x_t))
    where t is the row's argmax (no rounding of lse), x_t - lse otherwise."""
    valid = t != ignore_index
    ts = torch.where(valid, t, 0)
    x_t = x.gather(1, ts[:, None])
    others = x.scatter(1, ts[:, None], float("-inf"))
    s = torch.exp(others - x_t).sum(1)
    is_max = x_t[:, 0] >= x.max(1).values
    lp = torch.where(is_max, -torch.log1p(torch.where(is_max, s, 0.0)),
                     x_t[:, 0] - torch.logsumexp(x, 1))
    q = -torch.expm1(lp)
    a = torch.ones_like(lp) if alpha is None else alpha.double()[ts]
    loss = torch.where(valid, -a * q ** gamma * lp, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / torch.where(valid, a, 0.0).sum()


def compare(fn, ref_fn, x, grad_out=None, rtol=None, atol=None):
    """fn(x) vs ref_fn(x in float64): loss and input gradient, finite, within tolerance."""
    rtol = RTOL[x.dtype] if rtol is None else rtol
    xa = x.detach().clone().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    out = fn(xa)
    ref = ref_fn(xr)
    assert out.dtype == x.dtype and out.shape == ref.shape
    g = torch.Generator().manual_seed(123)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64) if grad_out is None else grad_out
    go = go.to(device=x.device, dtype=torch.float64)
    (gr,) = torch.autograd.grad(ref, xr, go)
    (g,) = torch.autograd.grad(out, xa, go.to(out.dtype))
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    lscale = ref.abs().max().item() if ref.numel() else 1.0
    gscale = gr.abs().max().item() if gr.numel() else 1.0
    a = rtol if atol is None else atol
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=a * max(lscale, 1e-30))
    # fp16 stores gradients below 6e-5 as subnormals, 6e-8 apart
    tiny = 6e-8 if x.dtype == torch.float16 else 1e-30
    torch.testing.assert_close(g.double(), gr, rtol=rtol, atol=max(a * gscale, tiny))
    return out, g


def blocks(device, dtype=torch.float64, k=8):
    """torchvision's test blocks: probabilities near 0, near 1 and anywhere, x targets all 0,
    all 1 and random; shape (9, k)."""
    g = torch.Generator().manual_seed(0)
    near0 = -torch.rand(k, generator=g) * 4 - 6  # p < 0.0025
    near1 = torch.rand(k, generator=g) * 4 + 6
    anywhere = torch.randn(k, generator=g) * 3
    xs, ys = [], []
    for x in (near0, near1, anywhere):
        for y in (torch.zeros(k), torch.ones(k), (torch.rand(k, generator=g) > 0.5).double()):
            xs.append(x)
            ys.append(y)
    return (torch.stack(xs).to(device=device, dtype=dtype),
            torch.stack(ys).to(device=device, dtype=dtype))


# ---------------------------------------------------------------- sigmoid focal


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.25, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_sigmoid_torchvision_parity(backend, alpha, gamma):
    x, y = blocks(backend.device)
    for reduction in ("none", "mean", "sum"):
        compare(lambda z: sigmoid_focal_loss(z, y, alpha, gamma, reduction),
                lambda z: tv_sigmoid(z, y, alpha, gamma, reduction), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sigmoid_dtypes_soft_targets(backend, dtype):
    g = torch.Generator().manual_seed(1)
    n = 300 if backend.interpreted else 5000
    x = (torch.randn(3, n, generator=g) * 4).to(device=backend.device, dtype=dtype)
    y = torch.rand(3, n, generator=g).to(device=backend.device, dtype=dtype)  # soft targets
    for gamma in (0.5, 2.0):
        compare(lambda z: sigmoid_focal_loss(z, y, 0.25, gamma, "none"),
                lambda z: tv_sigmoid(z, y.double(), 0.25, gamma, "none"), x)
        # a reduced loss sums in fp32 whatever the dtype
        compare(lambda z: sigmoid_focal_loss(z, y, 0.25, gamma, "mean"),
                lambda z: tv_sigmoid(z, y.double(), 0.25, gamma, "mean"), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_sigmoid_extreme_logits(backend, dtype, gamma):
    xs = torch.tensor(GRID, dtype=torch.float64)
    ys = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)
    x = xs[:, None].expand(-1, 3).to(device=backend.device, dtype=dtype)
    y = ys[None, :].expand(len(GRID), -1).to(device=backend.device, dtype=dtype)
    for alpha in (-1.0, 0.25):
        compare(lambda z: sigmoid_focal_loss(z, y, alpha, gamma, "none"),
                lambda z: stable_sigmoid(z, y.double(), alpha, gamma, "none"), x,
                atol=max(RTOL[dtype], 1e-6))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_gamma0_is_bce(backend, reduction):
    x, y = blocks(backend.device, torch.float32)
    x = x * 3
    compare(lambda z: sigmoid_focal_loss(z, y, -1.0, 0.0, reduction),
            lambda z: F.binary_cross_entropy_with_logits(z, y.double(), reduction=reduction),
            x, rtol=1e-6)
    w = torch.where(y > 0, 0.25, 0.75).double()
    compare(lambda z: sigmoid_focal_loss(z, y, 0.25, 0, reduction),
            lambda z: F.binary_cross_entropy_with_logits(z, y.double(), w, reduction=reduction),
            x, rtol=1e-6)


def test_sigmoid_chunks_and_noncontiguous(backend):
    # several 4096-element chunks with a tail (partial sums), read through a transposed view
    n = 3 * 4096 + 17
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(n, 2, generator=g) * 3).to(backend.device).t()
    y = (torch.rand(2, n, generator=g) > 0.8).float().to(backend.device)
    assert not x.is_contiguous()
    for reduction in ("none", "sum", "mean"):
        compare(lambda z: sigmoid_focal_loss(z, y, 0.25, 2.0, reduction),
                lambda z: tv_sigmoid(z, y.double(), 0.25, 2.0, reduction), x, rtol=1e-5)


def test_sigmoid_normalizer(backend):
    x, y = blocks(backend.device)
    num_pos = y.sum()
    compare(lambda z: sigmoid_focal_loss(z, y, normalizer=num_pos, reduction="sum"),
            lambda z: tv_sigmoid(z, y, reduction="sum") / num_pos, x)
    compare(lambda z: sigmoid_focal_loss(z, y, normalizer=num_pos, reduction="mean"),
            lambda z: tv_sigmoid(z, y, reduction="sum") / num_pos, x)
    compare(lambda z: sigmoid_focal_loss(z, y, normalizer=4, reduction="none"),
            lambda z: tv_sigmoid(z, y, reduction="none") / 4, x)
    # zero positives: the normalizer counts as 1, on the device
    y0 = torch.zeros_like(y)
    for n0 in (y0.sum(), 0, torch.zeros(1, dtype=torch.int64, device=backend.device)):
        out, _ = compare(lambda z: sigmoid_focal_loss(z, y0, normalizer=n0, reduction="mean"),
                         lambda z: tv_sigmoid(z, y0, reduction="sum"), x)
        assert out.item() > 0


def test_sigmoid_gradcheck(backend):
    x, y = blocks(backend.device, k=2)
    x = (x / 2).requires_grad_(True)
    y = torch.where(y > 0, 0.9, 0.2).to(x)  # soft
    for gamma, reduction in ((0.5, "none"), (2.0, "mean"), (3.5, "sum")):
        assert torch.autograd.gradcheck(
            lambda z: sigmoid_focal_loss(z, y, 0.25, gamma, reduction), (x,))
    assert torch.autograd.gradcheck(
        lambda z: sigmoid_focal_loss(z, y, normalizer=y.sum(), reduction="sum"), (x,))


def test_sigmoid_module_and_empty(backend):
    x, y = blocks(backend.device, torch.float32)
    mod = fusedloss.SigmoidFocalLoss(alpha=0.5, gamma=1.0)
    assert "alpha=0.5" in repr(mod)
    compare(lambda z: mod(z, y), lambda z: tv_sigmoid(z, y.double(), 0.5, 1.0, "mean"), x,
            rtol=1e-5)
    e = torch.zeros(0, 80, device=backend.device, requires_grad=True)
    t = torch.zeros(0, 80, device=backend.device)
    assert sigmoid_focal_loss(e, t, reduction="sum").item() == 0
    assert sigmoid_focal_loss(e, t, reduction="mean").isnan()
    out = sigmoid_focal_loss(e, t, reduction="none")
    assert out.shape == (0, 80)
    out.sum().backward()
    assert e.grad.shape == (0, 80)


# ---------------------------------------------------------------- softmax focal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_softmax_extreme_logits(backend, dtype, gamma):
    # rows [v, w, w, 0] with target 0, for every pair (v, w) of the grid
    v = torch.tensor(GRID, dtype=torch.float64)
    vv, ww = torch.meshgrid(v, v, indexing="ij")
    rows = torch.stack([vv.reshape(-1), ww.reshape(-1), ww.reshape(-1),
                        torch.zeros(vv.numel(), dtype=torch.float64)], 1)
    x = rows.to(device=backend.device, dtype=dtype)
    t = torch.zeros(len(rows), dtype=torch.int64, device=backend.device)
    alpha = torch.tensor([0.25, 0.5, 1.0, 2.0], device=backend.device)
    # (the interpreter is slow: there only the per-class alpha, which covers more of the kernel)
    for a in (alpha,) if backend.interpreted else (None, alpha):
        compare(lambda z: softmax_focal_loss(z, t, gamma, a, reduction="none"),
                lambda z: stable_softmax(z, t, gamma, a, reduction="none"), x,
                atol=max(RTOL[dtype], 1e-6))
    if not backend.interpreted:
        # the same rows as the pixels of one (1, C, R) image (the C++ spatial-tile path)
        compare(lambda z: softmax_focal_loss(z.t().contiguous()[None], t[None], gamma, alpha,
                                           reduction="none"),
                lambda z: stable_softmax(z, t, gamma, alpha, reduction="none")[None], x,
                atol=max(RTOL[dtype], 1e-6))


@pytest.mark.parametrize("C", [32, 100, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_row_sweeps(C, dtype):
    """(N, C) fp32 and bf16 rows of 32 to 768 classes take the C++ row sweeps (rows.h), here
    with every class a target, ignored rows (their gradient exact zeros) and alpha per class,
    against float64."""
    g = torch.Generator().manual_seed(5)
    n = C + 9
    x = (torch.randn(n, C, generator=g) * 3).to(dtype)
    t = torch.cat([torch.arange(C), torch.full((9,), -1)])
    alpha = torch.rand(C, generator=g) + 0.1
    for a in (None, alpha):
        compare(lambda z: softmax_focal_loss(z, t, 2.0, a, -1, "none"),
                lambda z: stable_softmax(z, t, 2.0, a, -1, "none"), x,
                rtol=2e-2 if dtype == torch.bfloat16 else 2e-5)
    xa = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(softmax_focal_loss(xa, t, 2.0, alpha, -1, "sum"), xa)
    assert (gx[C:] == 0).all() and gx[C:].signbit().logical_not().all()


@pytest.mark.parametrize("margin", MARGINS)
def test_softmax_confident_rows_elementwise(backend, margin):
    """Loss and every gradient element of confident rows, element by element against the
    cancellation-free float64 reference, for gamma 2 and 0.5, on rows and (C++) on pixel tiles."""
    for C in [2, 10, 1000]:
        x, t = confident_rows(16, C, margin)
        x, t = x.to(backend.device), t.to(backend.device)
        for gamma in (2.0, 0.5):
            xr = x.double().cpu().requires_grad_(True)
            ref = stable_softmax(xr, t.cpu(), gamma, reduction="none")
            (gr,) = torch.autograd.grad(ref.sum(), xr)
            layouts = [(x, t, lambda l: l)]
            if not backend.interpreted:  # the same rows as the pixels of one (1, C, 16) image
                layouts.append((x.t().contiguous()[None], t[None], lambda l: l[0]))
            for xl, tl_, back in layouts:
                xa = xl.clone().requires_grad_(True)
                out = back(softmax_focal_loss(xa, tl_, gamma, reduction="none"))
                (g,) = torch.autograd.grad(out.sum(), xa)
                g = back(g).t() if xl.dim() == 3 else g
                assert_rel(out.cpu(), ref.detach(), 1e-4, f"loss, C={C}, gamma={gamma}")
                assert_rel(g.cpu(), gr, 1e-4, f"gradient, C={C}, gamma={gamma}")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_softmax_gamma0_is_cross_entropy(backend, reduction):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 7, 3, 2, generator=g) * 4).to(backend.device)
    t = torch.randint(0, 7, (4, 3, 2), generator=g).to(backend.device)
    t[0, 0, 0] = t[2, 1, 1] = -1
    w = torch.rand(7, generator=g).to(backend.device)
    for alpha in (None, w):
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        out = softmax_focal_loss(xa, t, gamma=0.0, alpha=alpha, ignore_index=-1,
                                 reduction=reduction)
        ref = cross_entropy(xb, t, weight=alpha, ignore_index=-1, reduction=reduction)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
        go = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(out, xa, go)[0],
                                   torch.autograd.grad(ref, xb, go)[0], rtol=1e-6, atol=1e-7)
        # and torch's own cross_entropy, in float64
        compare(lambda z: softmax_focal_loss(z, t, 0.0, alpha, ignore_index=-1,
                                             reduction=reduction),
                lambda z: F.cross_entropy(z, t, None if alpha is None else alpha.double(),
                                          ignore_index=-1, reduction=reduction), x, rtol=1e-5)
    # scalar alpha: cross_entropy with weight = alpha for every class
    compare(lambda z: softmax_focal_loss(z, t, 0.0, 0.3, ignore_index=-1, reduction=reduction),
            lambda z: F.cross_entropy(z, t, torch.full((7,), 0.3, dtype=torch.float64,
                                                       device=z.device),
                                      ignore_index=-1, reduction=reduction), x, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3, 2), (5,)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_softmax_ignore_index_alpha(backend, shape, reduction):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(*shape, generator=g) * 3).to(backend.device)
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    t = torch.randint(0, 5, tshape, generator=g).to(backend.device)
    if t.dim():
        t.view(-1)[1] = 3 if len(shape) == 1 else 7  # ignore_index 7, outside [0, C)
        ignore = 7
    else:
        ignore = -100
    alpha = (torch.rand(5, generator=g) + 0.1).to(backend.device)

    def rows(z):  # (N, C, d...) -> (N*D, C), target alike
        return z.reshape(1, -1) if z.dim() == 1 else z.movedim(1, -1).reshape(-1, shape[1])

    for a in (None, alpha, 0.5):
        a_ref = torch.full((5,), a, device=backend.device) if isinstance(a, float) else a

        def ref(z, a_ref=a_ref):
            out = stable_softmax(rows(z), t.reshape(-1), 2.0, a_ref, ignore, reduction)
            return out.reshape(tshape) if reduction == "none" else out

        compare(lambda z: softmax_focal_loss(z, t, 2.0, a, ignore, reduction), ref, x, rtol=2e-5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_softmax_segmentation_tiles(reduction):
    """(N, C, H, W) with several 256-pixel tiles and a tail, ignored pixels and out-of-range
    ignore_index values, C++ only (the interpreter is too slow for this many rows)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 17, 31, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, 3, (2, 17, 31), generator=g)
    t[0, :5] = 255
    alpha = torch.rand(3, generator=g, dtype=torch.float64)

    def ref(z):
        return stable_softmax(z.movedim(1, -1).reshape(-1, 3), t.reshape(-1), 2.0, alpha, 255,
                              reduction)

    compare(lambda z: softmax_focal_loss(z, t, 2.0, alpha, 255, reduction),
            lambda z: ref(z).reshape(t.shape) if reduction == "none" else ref(z), x)
    # and in fp32, read through a channels-last layout (the row path)
    xc = x.float().contiguous(memory_format=torch.channels_last)
    compare(lambda z: softmax_focal_loss(z, t, 0.5, alpha.float(), 255, reduction),
            lambda z: (lambda r: r.reshape(t.shape) if reduction == "none" else r)(
                stable_softmax(z.movedim(1, -1).reshape(-1, 3), t.reshape(-1), 0.5, alpha, 255,
                               reduction)), xc, rtol=2e-5)


def test_softmax_noncontiguous_and_module(backend):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 6, generator=g) * 3).to(backend.device).t()  # (6, 9) with strides (1, 6)
    t = torch.randint(0, 9, (6,), generator=g).to(backend.device)
    mod = fusedloss.SoftmaxFocalLoss(gamma=1.5, alpha=torch.rand(9, generator=g).to(backend.device),
                                     reduction="sum")
    assert "gamma=1.5" in repr(mod)
    compare(lambda z: mod(z, t), lambda z: stable_softmax(z, t, 1.5, mod.alpha, reduction="sum"), x,
            rtol=1e-5)


def test_softmax_all_ignored_and_empty(backend):
    x = torch.randn(4, 3, device=backend.device, requires_grad=True)
    t = torch.full((4,), -100, device=backend.device)
    assert softmax_focal_loss(x, t, reduction="mean").isnan()  # 0 / 0, as cross_entropy
    out = softmax_focal_loss(x, t, reduction="sum")
    assert out.item() == 0
    (g,) = torch.autograd.grad(out, x)
    assert (g == 0).all()
    e = torch.zeros(0, 3, device=backend.device, requires_grad=True)
    out = softmax_focal_loss(e, torch.zeros(0, dtype=torch.int64, device=backend.device),
                             reduction="sum")
    out.backward()
    assert out.item() == 0 and e.grad.shape == (0, 3)


def test_softmax_gradcheck(backend):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64).to(backend.device)
    x.requires_grad_(True)
    t = torch.randint(0, 4, (3, 2), generator=g).to(backend.device)
    t[1, 0] = -100
    alpha = torch.rand(4, generator=g, dtype=torch.float64).to(backend.device)
    for gamma, reduction in ((0.5, "none"), (2.0, "mean"), (3.5, "sum")):
        assert torch.autograd.gradcheck(
            lambda z: softmax_focal_loss(z, t, gamma, alpha, reduction=reduction), (x,))


# ---------------------------------------------------------------- errors, ops, compile


def test_bad_input(backend):
    d = backend.device
    x = torch.randn(4, 3, device=d)
    t = torch.tensor([0, 1, 3, 2], device=d)
    if d.type != "cuda":  # on CUDA a device-side assert: test_checks.py
        with pytest.raises(IndexError, match="target 3 is out of bounds"):
            softmax_focal_loss(x, t)
        with pytest.raises(IndexError, match="target -2"):
            softmax_focal_loss(x, torch.tensor([0, -2, 1, 1], device=d))
    with pytest.raises(ValueError, match="target must have shape"):
        softmax_focal_loss(x, t[:3])
    with pytest.raises(TypeError, match="class indices"):
        softmax_focal_loss(x, t.float())
    with pytest.raises(ValueError, match="alpha must"):
        softmax_focal_loss(x, t.clamp(max=2), alpha=torch.ones(4, device=d))
    with pytest.raises(ValueError, match="gamma"):
        softmax_focal_loss(x, t.clamp(max=2), gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        softmax_focal_loss(x, t.clamp(max=2), reduction="avg")
    y = torch.zeros(4, 3, device=d)
    with pytest.raises(ValueError, match="targets must have"):
        sigmoid_focal_loss(x, y[:2])
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(x, y, gamma=float("nan"))
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="normalizer"):
        sigmoid_focal_loss(x, y, normalizer=torch.ones(2, device=d))
    with pytest.raises(ValueError, match="normalizer"):
        sigmoid_focal_loss(x, y, normalizer=-1.0)
    with pytest.raises(ValueError, match="targets must not require grad"):
        sigmoid_focal_loss(x, y.clone().requires_grad_(True))
    with pytest.raises(TypeError, match="inputs"):
        sigmoid_focal_loss(t, y)


def test_reference_backend_matches(monkeypatch):
    """The fallback backend (fusedloss.reference) gives what the C++ kernels give."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, 3, generator=g) * 8
    y = (torch.rand(5, 6, 3, generator=g) > 0.7).float()
    t = torch.randint(0, 6, (5, 3), generator=g)
    t[0, 0] = -100
    outs = {}
    for env in ("cpp", "reference"):
        monkeypatch.setattr(_backend, "_ENV", env)
        xa = x.clone().requires_grad_(True)
        la = sigmoid_focal_loss(xa, y, 0.25, 0.5, "sum")
        alpha = torch.rand(6, generator=torch.Generator().manual_seed(0))
        lb = softmax_focal_loss(xa, t, 0.5, alpha)
        outs[env] = (la, lb, torch.autograd.grad(la + lb, xa)[0])
    for a, b in zip(outs["cpp"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_opcheck():
    x = torch.randn(5, 13, 2) * 4
    y = (torch.rand(5, 13, 2) > 0.5).float()
    for args in [(x, y, None, 0.25, 2.0, False, True),
                 (x, y, torch.tensor(0.5), -1.0, 0.5, True, True),
                 (x.bfloat16(), y.bfloat16(), None, 0.25, 0.0, True, False)]:
        opcheck(torch.ops.fusedloss.sigmoid_focal_fwd.default, args)
    t = torch.randint(0, 13, (10,))
    t[3] = -100
    for args in [(x, t, None, None, -100, 2.0, True),
                 (x, t, torch.rand(13), torch.tensor(0.5), -100, 0.5, True),
                 (x.bfloat16(), t, None, None, -100, 0.0, False)]:
        opcheck(torch.ops.fusedloss.softmax_focal_fwd.default, args)


def test_opcheck_whole_softmax_loss():
    """fusedloss::softmax_focal (the one-call op with its autograd in C++) for every reduction,
    alpha, fp64 (gradcheck) and bf16 under an fp32 out_dtype (autocast)."""
    t = torch.randint(0, 13, (5, 2))
    t[1, 0] = -100
    alpha = torch.rand(13, dtype=torch.float64)
    for dtype, out in [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)]:
        x = (torch.randn(5, 13, 2, dtype=torch.float64) * 3).to(dtype).requires_grad_()
        for red in (0, 1, 2):
            for a, gamma in [(None, 2.0), (alpha, 0.5)]:
                opcheck(torch.ops.fusedloss.softmax_focal.default,
                        (x, t, a, gamma, -100, red, out))


def test_whole_softmax_op_graph_rules():
    """The C++ node of fusedloss::softmax_focal hands its gradient over for grad_output 1 and
    keeps autograd's rules: with retain_graph the second backward gives the same gradient even
    after .grad was changed in place (the handed-over tensor was copied, not kept), without it a
    second backward raises, grad_output scales, a second derivative raises (as the Python
    Function's once_differentiable), alpha gets no gradient, and under no_grad no graph."""
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 5, generator=g) * 3).requires_grad_()
    t = torch.tensor([0, 4, -100, 2, 3, 1])
    xd = x.detach().double().requires_grad_()
    want = torch.autograd.grad(stable_softmax(xd, t, 2.0), xd)[0].float()
    loss = softmax_focal_loss(x, t)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-7)
    g1 = x.grad.clone()
    x.grad.zero_()
    loss.backward()
    assert torch.equal(x.grad, g1)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    for red, go in [("mean", torch.tensor(3.0)), ("none", torch.rand(6, generator=g))]:
        (gs,) = torch.autograd.grad(softmax_focal_loss(x, t, reduction=red), x, go)
        (gr,) = torch.autograd.grad(stable_softmax(xd, t, 2.0, reduction=red), xd, go.double())
        torch.testing.assert_close(gs.double(), gr, rtol=1e-5, atol=1e-7)
    loss = softmax_focal_loss(x, t)
    (gg,) = torch.autograd.grad(loss, x, torch.ones((), requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable again"):
        gg.sum().backward()
    alpha = torch.rand(5, requires_grad=True)
    loss = softmax_focal_loss(x, t, alpha=alpha)
    assert torch.autograd.grad(loss, (x, alpha), allow_unused=True)[1] is None
    with torch.no_grad():
        assert softmax_focal_loss(x, t).grad_fn is None


def test_compile_fullgraph():
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(4, 5, 1)
    sfl = fusedloss.SoftmaxFocalLoss(gamma=2.0, alpha=torch.rand(5), ignore_index=-1)

    def step(h, t, y):
        out = conv(h)
        return sfl(out, t) + sigmoid_focal_loss(out, y, reduction="sum", normalizer=y.sum())

    h = torch.randn(2, 4, 3, 3)
    t = torch.randint(0, 5, (2, 3, 3))
    t[0, 0, 0] = -1
    y = (torch.rand(2, 5, 3, 3) > 0.8).float()
    assert_compiled_matches_eager(step, (h, t, y), conv.weight)


def test_fp64_options_exact(backend):
    """alpha and gamma reach the kernels as fp64: float64 losses within 1e-10 of float64
    references computed without cancellation (fp32-rounded arguments are off by ~1e-8; the
    compiled kernels' fp64 declarations are checked in test_triton_compile.py)."""
    d = backend.device
    x = torch.randn(6, 7, dtype=torch.float64, device=d) * 3
    y = (torch.rand(6, 7, device=d) > 0.5).double()
    out = sigmoid_focal_loss(x, y, alpha=0.1, gamma=0.3)
    assert_rel(out.cpu(), stable_sigmoid(x, y, 0.1, 0.3).cpu(), 1e-10, "fp64 sigmoid focal")
    t = torch.randint(0, 7, (6,), device=d)
    out = softmax_focal_loss(x, t, gamma=0.3, reduction="none")
    lp = torch.log_softmax(x, 1).gather(1, t[:, None])[:, 0]
    ref = -(-torch.expm1(lp)) ** 0.3 * lp
    assert_rel(out.cpu(), ref.cpu(), 1e-10, "fp64 softmax focal")


@pytest.mark.parametrize("value", [3, -1])
def test_softmax_target_out_of_range(backend, value):
    """target == C and target == -1 (not ignored) raise IndexError, 2-d and spatial."""
    if backend.device.type == "cuda":
        pytest.skip("on CUDA a bad target trips a device-side assert: test_checks.py")
    d = backend.device
    for x, t in [(torch.randn(4, 3, device=d), torch.tensor([0, 1, value, 2], device=d)),
                 (torch.randn(2, 3, 2, device=d), torch.tensor([[0, 1], [2, value]], device=d))]:
        with pytest.raises(IndexError, match=f"target {value} is out of bounds for 3 classes"):
            softmax_focal_loss(x, t)
        softmax_focal_loss(x, t, ignore_index=value)


def test_sigmoid_torchvision_errors():
    """torchvision 0.29's rules and messages: alpha in [0, 1] or -1, and its reduction text (its
    own tests match "Invalid")."""
    x, y = torch.randn(3, 4), torch.rand(3, 4)
    for alpha in [1.5, -0.5, -2.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match=r"Invalid alpha value: .*alpha must be in the range "
                                             r"\[0,1\] or -1 for ignore\."):
            sigmoid_focal_loss(x, y, alpha=alpha)
    for alpha in [-1, -1.0, 0.0, 1.0, 0.25]:
        sigmoid_focal_loss(x, y, alpha=alpha)
    with pytest.raises(ValueError, match="Invalid Value for arg 'reduction': 'avg \n Supported "
                                         "reduction modes: 'none', 'mean', 'sum'"):
        sigmoid_focal_loss(x, y, reduction="avg")
    with pytest.raises(TypeError, match="alpha must be a real number"):
        sigmoid_focal_loss(x, y, alpha="0.25")


@pytest.mark.parametrize("path", ["rows", "row"])
def test_softmax_rows_per_program_paths(monkeypatch, path):
    """Triton softmax focal with several rows per program (small C) and with one row per program
    (forced): confident rows, gamma 0 = cross-entropy, ignore_index and alpha, gradcheck. The
    other path's kernel raises if launched."""
    from conftest import Backend
    from fusedloss.kernels import _common, focal as kfocal
    monkeypatch.setattr(fusedloss._backend, "_ENV", "triton")
    be = Backend("triton", "triton", "cuda" if torch.cuda.is_available() else "cpu")

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError(f"the {path} path launched the other path's kernel")

    if path == "row":
        monkeypatch.setattr(_common, "ROWS_MAX_C", 0)
    name = "_softmax_focal_fwd_rows_kernel" if path == "row" else "_softmax_focal_fwd_kernel"
    monkeypatch.setattr(kfocal, name, Forbidden())
    test_softmax_confident_rows_elementwise(be, 30.0)
    test_softmax_gamma0_is_cross_entropy(be, "none")
    test_softmax_ignore_index_alpha(be, (2, 5, 3, 2), "none")
    test_softmax_gradcheck(be)


def test_softmax_spatial_tiles(monkeypatch):
    """Triton softmax focal on (N, C, H, W) with contiguous pixels: only the tile kernel runs
    (BLOCK_D pixels per program sweeping the classes); ignore_index and alpha, and confident
    pixels element by element with several class blocks and a partial pixel tile."""
    from conftest import Backend
    from fusedloss.kernels import focal as kfocal
    monkeypatch.setattr(fusedloss._backend, "_ENV", "triton")
    be = Backend("triton", "triton", "cuda" if torch.cuda.is_available() else "cpu")

    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("an (N, C, H, W) input launched a row kernel")

    for name in ("_softmax_focal_fwd_kernel", "_softmax_focal_fwd_rows_kernel"):
        monkeypatch.setattr(kfocal, name, Forbidden())
    test_softmax_ignore_index_alpha(be, (2, 5, 4, 4), "none")  # 16 pixels: _common.TILE_MIN_D
    for C in (10, 300):  # C = 300: ten class blocks of 32; 130 pixels: two tiles
        x, t = confident_rows(130, C, 30.0)
        xi, ti = x.t().contiguous()[None].to(be.device), t[None].to(be.device)
        for gamma in (2.0, 0.5):
            xr = x.double().requires_grad_(True)
            ref = stable_softmax(xr, t, gamma, reduction="none")
            (gr,) = torch.autograd.grad(ref.sum(), xr)
            xa = xi.clone().requires_grad_(True)
            out = softmax_focal_loss(xa, ti, gamma, reduction="none")
            (g,) = torch.autograd.grad(out.sum(), xa)
            assert_rel(out[0].cpu(), ref.detach(), 1e-4, f"loss, C={C}, gamma={gamma}")
            assert_rel(g[0].t().cpu(), gr, 1e-4, f"gradient, C={C}, gamma={gamma}")
