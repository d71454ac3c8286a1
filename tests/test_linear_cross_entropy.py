"""Linear + cross-entropy: parity with float64 F.cross_entropy(F.linear(x, W, b), t) for the value
and the gradients of input, linear_weight and linear_bias, on every backend; the blocks bound the
memory (no [N, V] allocation)."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fusedloss
from fusedloss.functional import linear_cross_entropy

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def reference(x, W, t, b=None, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0):
    """float64 linear + cross_entropy, plus the z-loss term (torch has none), reduced alike."""
    ignore_index = -100 if ignore_index is None else ignore_index
    logits = F.linear(x.double(), W.double(), None if b is None else b.double())
    w = None if weight is None else weight.double()
    logits2, t2 = logits.reshape(-1, W.shape[0]), t.reshape(-1).long()
    loss = F.cross_entropy(logits2, t2, weight=w, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = t2 != ignore_index
    loss = loss + torch.where(valid, z_loss * torch.logsumexp(logits2, 1).square(), 0.0)
    if reduction == "none":
        return loss.view(t.shape)
    if reduction == "sum":
        return loss.sum()
    wy = valid.double() if w is None else torch.where(valid, w[t2.clamp(min=0)], 0.0)
    return loss.sum() / wy.sum()


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def close(a, e, atol):
    scale = e.abs().max().item() if e.numel() else 1.0
    torch.testing.assert_close(a.double(), e.double(), atol=atol * max(1.0, scale), rtol=atol,
                               equal_nan=True)


def check(x, W, t, b=None, grad_out=None, atol=None, **kw):
    """Loss and the gradients of x, W (and b) vs the float64 reference."""
    atol = ATOL[x.dtype] if atol is None else atol
    xa, Wa, ba = leaves(x, W, b)
    xr, Wr, br = leaves(x.double(), W.double(), None if b is None else b.double())
    out = linear_cross_entropy(xa, Wa, t, linear_bias=ba, **kw)
    kw.pop("block_rows", None)
    ref = reference(xr, Wr, t, br, **kw)
    assert out.dtype == x.dtype and out.shape == ref.shape
    close(out, ref.detach(), atol)
    go = torch.randn(ref.shape, dtype=torch.float64) if grad_out is None else grad_out
    ins = [xa, Wa] + ([ba] if b is not None else [])
    refs = [xr, Wr] + ([br] if b is not None else [])
    grads = torch.autograd.grad(out, ins, go.to(out.dtype))
    grads_ref = torch.autograd.grad(ref, refs, go)
    for g, gr in zip(grads, grads_ref):
        assert g.dtype == x.dtype and g.shape == gr.shape
        close(g, gr, atol)
    return out, grads


def make(n, d, v, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    W = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 3).to(device, dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(device, dtype)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    return x, W, b, t


def tol(backend, dtype=torch.float64):
    # The Triton kernels take label_smoothing / z_loss as fp32 scalars: ~1e-8 relative in fp64.
    return 1e-7 if backend.env == "triton" and dtype == torch.float64 else ATOL[dtype]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.2, 0.0), (0.1, 0.05)])
@pytest.mark.parametrize("bias", [False, True])
def test_options(backend, reduction, weighted, eps, z, bias):
    """The options grid; 7 rows in blocks of 3 (the last one partial), V = 13."""
    x, W, b, t = make(7, 5, 13, device=backend.device)
    t[::3] = -100
    w = torch.rand(13, dtype=torch.float64, device=backend.device) + 0.1 if weighted else None
    check(x, W, t, b if bias else None, weight=w, reduction=reduction, label_smoothing=eps,
          z_loss=z, block_rows=3, atol=tol(backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ignore_index_real_class_and_default(backend, dtype):
    x, W, b, t = make(6, 4, 9, dtype=dtype, device=backend.device)
    t[1] = 3
    check(x, W, t, ignore_index=3, label_smoothing=0.1, block_rows=4, atol=tol(backend, dtype))
    t[2] = -100  # ignore_index=None (torch's default) means -100 for class indices
    check(x, W, t, b, ignore_index=None, atol=tol(backend, dtype))


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_input_shapes(backend, shape):
    """(D,) with target (), (N, D), and (B, T, D) with target (B, T) (an extension of torch's)."""
    x, W, b, t = make(max(1, int(torch.tensor(shape).prod())), 6, 11, device=backend.device)
    x, t = x.reshape(*shape, 6), t.reshape(shape)
    for red in ("none", "mean"):
        check(x, W, t, b, reduction=red, z_loss=0.01, block_rows=2, atol=tol(backend))


def test_default_block_and_big_block(backend):
    """N smaller than one block (default size), and block_rows larger than N."""
    x, W, b, t = make(5, 8, 37, device=backend.device)
    check(x, W, t, b, label_smoothing=0.1, atol=tol(backend))
    check(x, W, t, b, block_rows=1000, reduction="sum")
    check(x, W, t, b, block_rows=1, reduction="none")


def test_non_contiguous(backend):
    """A transposed head weight, a strided input and a uint8 target."""
    x, W, b, t = make(6, 4, 9, device=backend.device)
    Wt = W.t().contiguous().t()  # [V, D] with strides (1, V)
    xs = torch.randn(6, 8, dtype=torch.float64, device=backend.device)[:, ::2]
    check(xs, Wt, t.to(torch.uint8), b, label_smoothing=0.1, block_rows=4, atol=tol(backend))
    check(x, Wt, t, b, reduction="none", block_rows=4)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_ignored_and_empty(backend, reduction):
    x, W, b, t = make(4, 3, 5, device=backend.device)
    t[:] = -100
    out, grads = check(x, W, t, b, reduction=reduction, block_rows=3)
    assert all(bool((g == 0).all()) for g in grads)
    x0, t0 = x[:0], t[:0]
    out, grads = check(x0, W, t0, b, reduction=reduction)
    assert all(bool((g == 0).all()) for g in grads)


def test_scalar_grad_output(backend):
    """mean / sum form the gradient in forward; backward scales it by grad_output."""
    x, W, b, t = make(6, 4, 7, device=backend.device)
    for red in ("mean", "sum"):
        check(x, W, t, b, reduction=red, grad_out=torch.tensor(-2.5, dtype=torch.float64),
              block_rows=4)


def test_only_some_grads(backend):
    """Gradients only for what requires them; none at all under no_grad."""
    x, W, b, t = make(6, 4, 7, device=backend.device)
    Wa = W.clone().requires_grad_(True)
    out = linear_cross_entropy(x, Wa, t, linear_bias=b, block_rows=4)
    (gW,) = torch.autograd.grad(out, Wa)
    Wr = W.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(reference(x, Wr, t, b), Wr)
    close(gW, gr, 1e-10)
    xa = x.clone().requires_grad_(True)
    with torch.no_grad():
        out = linear_cross_entropy(xa, W, t, linear_bias=b)
    assert not out.requires_grad
    close(out, reference(x, W, t, b), 1e-10)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck(backend, reduction):
    x, W, b, t = make(5, 3, 6, device=backend.device)
    t[1] = -100
    w = torch.rand(6, dtype=torch.float64, device=backend.device) + 0.1
    xa, Wa, ba = leaves(x, W, b)
    assert torch.autograd.gradcheck(
        lambda x, W, b: linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction,
                                             label_smoothing=0.25, z_loss=0.125, block_rows=2),
        (xa, Wa, ba), fast_mode=backend.interpreted)  # the interpreter is slow


def test_tied_weight(backend):
    """One tensor as embedding and head: it receives both gradients."""
    torch.manual_seed(0)
    v, d = 10, 4
    tokens = torch.randint(0, v, (2, 5), device=backend.device)
    target = torch.randint(0, v, (2, 5), device=backend.device)
    grads = []
    for fused in (True, False):
        E = torch.randn(v, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        E = E.to(backend.device).requires_grad_(True)
        h = torch.tanh(F.embedding(tokens, E))
        if fused:
            loss = fusedloss.LinearCrossEntropy(label_smoothing=0.1)(h, E, target)
        else:
            loss = F.cross_entropy(F.linear(h, E).reshape(-1, v), target.reshape(-1),
                                   label_smoothing=0.1)
        loss.backward()
        grads.append(E.grad)
    close(grads[0], grads[1], tol(backend))


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_vs_float64(backend, seed):
    """bf16 inputs: within bf16 tolerance of float64 and no more than 3x torch's own bf16 error
    (linear + cross_entropy in bf16) on the loss and every gradient."""
    n, d, v = (8, 16, 40) if backend.interpreted else (64, 64, 300)
    x, W, b, t = make(n, d, v, dtype=torch.bfloat16, device=backend.device, seed=seed)
    t[::5] = -100
    args = [leaves(x, W, b) for _ in range(3)]
    xr, Wr, br = leaves(x.double(), W.double(), b.double())
    outs = [linear_cross_entropy(*args[0][:2], t, linear_bias=args[0][2], block_rows=8,
                                 label_smoothing=0.1),
            F.cross_entropy(F.linear(*args[1]), t, label_smoothing=0.1),
            F.cross_entropy(F.linear(xr, Wr, br), t, label_smoothing=0.1)]
    for o, a in zip(outs, args[:2] + [(xr, Wr, br)]):
        o.backward()
    ref_vals = [outs[2].detach()] + [p.grad for p in (xr, Wr, br)]
    ours = [outs[0].detach()] + [p.grad for p in args[0]]
    torchs = [outs[1].detach()] + [p.grad for p in args[1]]
    for o, tt, r in zip(ours, torchs, ref_vals):
        err = (o.double() - r).abs().max().item()
        err_torch = (tt.double() - r).abs().max().item()
        assert err <= 3 * err_torch + 1e-3 * r.abs().max().item(), (err, err_torch)
        close(o, r, 3e-2)


def test_autocast():
    """Under autocast: GEMMs in bf16, loss in fp32, as linear + cross_entropy there."""
    x, W, b, t = make(6, 8, 20, dtype=torch.float32)
    outs, grads = [], []
    for fused in (True, False):
        xa, Wa, ba = leaves(x, W, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = (linear_cross_entropy(xa, Wa, t, linear_bias=ba) if fused
                   else F.cross_entropy(F.linear(xa, Wa, ba), t))
        out.backward()
        outs.append(out)
        grads.append((xa.grad, Wa.grad, ba.grad))
    assert outs[0].dtype == outs[1].dtype == torch.float32
    close(outs[0], outs[1].detach(), 1e-2)
    for g, gr in zip(*grads):
        assert g.dtype == gr.dtype == torch.float32
        close(g, gr, 2e-2)


def test_retain_graph():
    x, W, b, t = make(4, 3, 5)
    xa = x.clone().requires_grad_(True)
    out = linear_cross_entropy(xa, W, t, reduction="none")
    out.sum().backward(retain_graph=True)
    out.sum().backward()  # 'none' recomputes: a second backward works
    (gr,) = torch.autograd.grad(reference(x.requires_grad_(True), W, t, reduction="sum"), x)
    close(xa.grad, 2 * gr, 1e-10)
    xa.grad = None
    out = linear_cross_entropy(xa, W, t, reduction="sum")
    out.backward(retain_graph=True)  # mean / sum: scales the gradients formed in forward
    out.backward(torch.tensor(3.0, dtype=torch.float64))  # then recomputes them
    close(xa.grad, 4 * gr, 1e-10)


def test_matches_torch_linear_cross_entropy():
    """Drop-in: the same value and gradients as torch's F.linear_cross_entropy (reference and
    chunked), including a probability target and a K-dimensional head (our plain path)."""
    x, W, b, t = make(6, 5, 9)
    t[0] = -100
    w = torch.rand(9, dtype=torch.float64) + 0.5
    probs = torch.randn(6, 9, dtype=torch.float64).softmax(1)
    cases = [(t, dict(weight=w, label_smoothing=0.1)), (t, dict(reduction="sum")),
             (probs, dict(label_smoothing=0.1))]
    for target, kw in cases:
        for options in (None, torch.nn.LinearCrossEntropyOptions()):
            if options is not None and kw.get("label_smoothing"):
                continue
            xa, Wa, ba = leaves(x, W, b)
            xr, Wr, br = leaves(x, W, b)
            out = linear_cross_entropy(xa, Wa, target, linear_bias=ba, **kw)
            ref = F.linear_cross_entropy(xr, Wr, target, linear_bias=br, options=options, **kw)
            close(out, ref.detach(), 1e-10)
            for g, gr in zip(torch.autograd.grad(out, (xa, Wa, ba)),
                             torch.autograd.grad(ref, (xr, Wr, br))):
                close(g, gr, 1e-10)
    W3 = torch.randn(4, 2, 5, dtype=torch.float64)  # K-dim: (C, d1, D), target (N, d1)
    t3 = torch.randint(0, 4, (6, 2))
    close(linear_cross_entropy(x, W3, t3), F.linear_cross_entropy(x, W3, t3), 1e-10)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):
        linear_cross_entropy(x, W, probs, ignore_index=-100)


def test_modules():
    torch.manual_seed(0)
    ours = fusedloss.LinearCrossEntropyLoss(5, 9, bias=True, dtype=torch.float64,
                                            label_smoothing=0.1, reduction="sum")
    theirs = torch.nn.LinearCrossEntropyLoss(5, 9, bias=True, dtype=torch.float64,
                                             label_smoothing=0.1, reduction="sum")
    ours.load_state_dict(theirs.state_dict())  # same attribute names: the state dicts swap
    x, _, _, t = make(6, 5, 9)
    a, b = ours(x, t), theirs(x, t)
    close(a, b.detach(), 1e-10)
    a.backward()
    b.backward()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        close(p.grad, q.grad, 1e-10)
    loss_fn = fusedloss.LinearCrossEntropy(reduction="none", z_loss=1e-3, block_rows=2)
    assert "z_loss" in repr(loss_fn) and "num_classes=9" in repr(ours)
    x, W, b, t = make(5, 4, 7)
    close(loss_fn(x, W, t, b), reference(x, W, t, b, reduction="none", z_loss=1e-3), 1e-10)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=(4, 5)), RuntimeError, "last dimensions.*got 5 and 3"),
    (dict(weight=(7,)), ValueError, r"weight must have shape \(6,\)"),
    (dict(w_dtype=torch.float32), RuntimeError, "linear_weight has dtype torch.float32"),
    (dict(bias=(5,)), RuntimeError, "expected linear_bias shape"),
    (dict(t=(3,)), RuntimeError, "target must have shape"),
    (dict(t_dtype=torch.int32), RuntimeError, "target must hold int64"),
    (dict(target_value=6), IndexError, "target 6 is out of bounds"),
    (dict(target_value=-5), IndexError, "target -5 is out of bounds"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(block_rows=0), ValueError, "block_rows"),
])
def test_bad_input(backend, kwargs, exc, match):
    kw = dict(kwargs)
    x = torch.randn(*kw.pop("x", (4, 3)), device=backend.device)
    W = torch.randn(6, 3, dtype=kw.pop("w_dtype", torch.float32), device=backend.device)
    if "w_dtype" in kwargs:
        x = x.double()
    t = torch.randint(0, 6, kw.pop("t", (4,)), device=backend.device).to(
        kw.pop("t_dtype", torch.int64))
    if "target_value" in kw:
        t[1] = kw.pop("target_value")
    if "weight" in kw:
        kw["weight"] = torch.rand(kw.pop("weight"), device=backend.device)
    if "bias" in kw:
        kw["linear_bias"] = torch.randn(kw.pop("bias"), device=backend.device)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(x, W, t, **kw)


def test_bad_input_device():
    x, W = torch.randn(4, 3), torch.randn(6, 3, device="meta")
    with pytest.raises(ValueError, match="linear_weight is on meta"):
        linear_cross_entropy(x, W, torch.zeros(4, dtype=torch.long))


def test_opcheck():
    x, W, b, t = make(5, 3, 7, dtype=torch.float32)
    t[2] = -100
    w = torch.rand(7)
    op = torch.ops.fusedloss.linear_cross_entropy.default
    for bias in (None, b):
        for scale in (None, torch.full((1,), 0.5), torch.rand(5)):
            for weight in (None, w):
                opcheck(op, (x, W, bias, t, weight, scale, -100, 0.1, 0.01, 2, True, True, True))
    opcheck(op, (x, W, b, t, None, torch.ones(1), -100, 0.0, 0.0, 3, False, True, False))


def test_compile_fullgraph():
    x, W, b, t = make(6, 4, 9, dtype=torch.float32)
    for reduction in ("mean", "none"):
        fn = torch.compile(lambda x, W, b, t: linear_cross_entropy(
            x, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.1, block_rows=4),
            fullgraph=True, backend="aot_eager")
        xa, Wa, ba = leaves(x, W, b)
        out = fn(xa, Wa, ba, t)
        ref = reference(*leaves(x, W), t, b, reduction=reduction, label_smoothing=0.1)
        close(out, ref.detach(), 2e-5)
        out.sum().backward()
        xr, Wr, br = leaves(x.double(), W.double(), b.double())
        reference(xr, Wr, t, br, reduction=reduction, label_smoothing=0.1).sum().backward()
        for g, gr in zip((xa.grad, Wa.grad, ba.grad), (xr.grad, Wr.grad, br.grad)):
            close(g, gr, 2e-5)


def test_no_logits_sized_allocation(backend):
    """The largest single allocation of forward + backward is a gradient ([V, D]) or the logits
    block ([block_rows, V]), never [N, V] (profiler memory events, CPU allocator)."""
    n, d, v, rows = (48, 4, 256, 4) if backend.interpreted else (512, 16, 2000, 32)
    x, W, b, t = make(n, d, v, dtype=torch.float32, device=backend.device)
    xa, Wa, ba = leaves(x, W, b)
    for reduction in ("mean", "none"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            out = linear_cross_entropy(xa, Wa, t, linear_bias=ba, block_rows=rows,
                                       reduction=reduction)
            out.sum().backward()
        sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
        assert sizes, "the profiler saw no allocation"
        bound = max(rows * v, v * d, n * d) * 4
        assert max(sizes) <= bound < n * v * 4, (max(sizes), bound)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_reference_backend(monkeypatch, reduction):
    """FUSEDLOSS_BACKEND=reference (the fallback without the C++ extension): the same blocks over
    the plain-PyTorch cross-entropy."""
    from fusedloss import _backend

    monkeypatch.setattr(_backend, "_ENV", "reference")
    x, W, b, t = make(7, 4, 11)
    t[3] = -100
    check(x, W, t, b, reduction=reduction, label_smoothing=0.1, z_loss=0.01, block_rows=3,
          weight=torch.rand(11, dtype=torch.float64) + 0.1)
