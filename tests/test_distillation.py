"""Distillation loss: forward KL, reverse KL and the generalised JSD between softmaxes at a
temperature, plus the hard-label term, against float64 formulas written from their definitions,
on every backend."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fusedloss
from fusedloss.functional import distillation_loss
from conftest import assert_compiled_matches_eager

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
REDUCTIONS = ["none", "batchmean", "sum", "mean"]


def kl(lp, lq):
    """KL(p || q) per row from log-probabilities; a class where p = 0 contributes 0."""
    return torch.where(lp > float("-inf"), lp.exp() * (lp - lq), 0.0).sum(-1)


def reference(s, t, target=None, temperature=1.0, beta=0.0, ignore_index=-100,
              reduction="batchmean", hard_weight=0.0):
    """The loss in float64, from the definitions (README.md, "Distillation")."""
    s, t = s.double(), t.double()
    lq = torch.log_softmax(s / temperature, -1)
    lp = torch.log_softmax(t / temperature, -1)
    if beta == 0:
        d = kl(lp, lq)
    elif beta == 1:
        d = kl(lq, lp)
    else:
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), 0)
        d = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    loss = temperature ** 2 * d
    valid = torch.ones(s.shape[:-1], dtype=torch.bool, device=s.device)
    if target is not None:
        valid = target != ignore_index
        if hard_weight:
            ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1),
                                 ignore_index=ignore_index, reduction="none")
            loss = loss + hard_weight * ce.view(target.shape)
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    total = loss.sum()
    n = valid.sum()
    return {"sum": total, "batchmean": total / n, "mean": total / (n * s.shape[-1])}[reduction]


def check(s, t, target=None, grad_out=None, atol=None, **kw):
    """Loss and student gradient of fusedloss vs the float64 reference on the same values."""
    atol = ATOL[s.dtype] if atol is None else atol
    sa = s.detach().clone().requires_grad_(True)
    sr = s.detach().double().requires_grad_(True)
    out = distillation_loss(sa, t, target, **kw)
    ref = reference(sr, t, target, **kw)
    assert out.dtype == s.dtype and out.shape == ref.shape
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol * scale, rtol=atol,
                               equal_nan=True)
    go = torch.randn_like(ref) if grad_out is None else grad_out.double()
    (gr,) = torch.autograd.grad(ref, sr, go)
    (g,) = torch.autograd.grad(out, sa, go.to(out.dtype))
    assert g.dtype == s.dtype and g.shape == s.shape
    gscale = max(gr.abs().max().item(), 0.1) if gr.numel() else 1.0  # V = 1: all 0
    torch.testing.assert_close(g.double(), gr, atol=atol * gscale, rtol=atol)
    return out, g


def logits(*shape, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device,
                                                                               dtype=dtype)


BETAS = [0.0, 1.0, 0.5, 0.1]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_modes(backend, beta, reduction):
    d = backend.device
    s, t = logits(3, 4, 37, device=d), logits(3, 4, 37, device=d, seed=1)
    target = torch.randint(0, 37, (3, 4), device=d)
    target[0, 1] = target[2, 3] = -100
    check(s, t, target, beta=beta, reduction=reduction)
    for temperature in [2.0, 0.5]:
        check(s, t, temperature=temperature, beta=beta, reduction=reduction)
        check(s, t, target, temperature=temperature, beta=beta, reduction=reduction,
              hard_weight=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_dtypes(backend, dtype, beta):
    d = backend.device
    s, t = logits(5, 1000, dtype=dtype, device=d), logits(5, 1000, dtype=dtype, device=d, seed=1)
    target = torch.randint(0, 1000, (5,), device=d)
    check(s, t, target, temperature=2.0, beta=beta, hard_weight=0.5, reduction="sum")
    check(s, t, target, beta=beta, reduction="none")


@pytest.mark.parametrize("V", [1, 2, 1025, 4099, 70001])
def test_vocab_sizes_and_blocks(backend, V):
    """Rows over several blocks (kBlock = 1024 in C++, up to 65536 per block in Triton) whose
    maxima sit in the first or in the last block, so that the running sums are rescaled."""
    d = backend.device
    s, t = logits(4, V, device=d), logits(4, V, device=d, seed=1)
    s[0, -1] = t[1, -1] = 30.0  # the max arrives last
    s[2, 0] = t[3, 0] = 30.0  # the max comes first
    target = torch.tensor([V - 1, 0, -100, V // 2], device=d)
    for beta in [0.0, 1.0, 0.3]:
        check(s, t, target, temperature=1.5, beta=beta, hard_weight=0.2, reduction="none")


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_teacher_with_zero_mass(backend, beta):
    """A teacher that puts exactly zero mass on classes (logits -inf, or so negative that exp
    underflows) gives a finite loss and gradient (0 log 0 = 0), equal to the definition's."""
    d = backend.device
    s, t = logits(4, 50, device=d), logits(4, 50, device=d, seed=1)
    t[0, :10] = float("-inf")
    t[1, 1::2] = float("-inf")
    t[2, 5] = -1e4
    t[3, :49] = float("-inf")  # one class holds all of the teacher's mass
    for temperature in [1.0, 3.0]:
        out, g = check(s, t, beta=beta, temperature=temperature, reduction="none")
        assert out.isfinite().all() and g.isfinite().all()
    out, g = check(s.bfloat16(), t.bfloat16(), beta=beta, reduction="sum")
    assert out.isfinite() and g.isfinite().all()


def test_reverse_kl_of_zero_mass_teacher_is_infinite(backend):
    """KL(student || teacher) is +inf where the teacher has no mass and the student has some
    (the definition's value, documented); large finite negatives stay finite."""
    d = backend.device
    s, t = logits(2, 20, device=d), logits(2, 20, device=d, seed=1)
    t[0, 3] = float("-inf")
    t[1, 3] = -1e4
    out = distillation_loss(s, t, beta=1.0, reduction="none")
    assert out[0] == float("inf")
    check(s[1:], t[1:], beta=1.0, reduction="none")


def test_extreme_logits_finite(backend):
    d = backend.device
    s = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 1.0], [0.0, 0.0, 0.0]], device=d)
    t = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 0.0, 0.0], [1e30, -1e30, 0.0]], device=d)
    target = torch.tensor([0, 1, 2], device=d)
    for beta in [0.0, 0.5]:
        out, g = check(s, t, target, beta=beta, hard_weight=1.0, reduction="none")
        assert out.isfinite().all() and g.isfinite().all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index(backend, reduction):
    d = backend.device
    s, t = logits(6, 11, device=d), logits(6, 11, device=d, seed=1)
    target = torch.randint(0, 11, (6,), device=d)
    target[::2] = 3  # ignore_index may be a real class
    out, g = check(s, t, target, ignore_index=3, beta=0.5, hard_weight=0.3, reduction=reduction)
    assert bool((g[::2] == 0).all()) and bool((g[1::2] != 0).any())
    # all rows ignored: 0 for 'sum', NaN (0 / 0) for the means, gradient 0
    allign = torch.full((6,), -100, device=d)
    out, g = check(s, t, allign, reduction=reduction)
    assert bool((g == 0).all())
    if reduction in ("batchmean", "mean"):
        assert out.isnan()
    # an empty batch
    check(s[:0], t[:0], allign[:0], reduction=reduction)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_grad_output_per_row(backend, beta):
    d = backend.device
    s, t = logits(2, 5, 9, device=d), logits(2, 5, 9, device=d, seed=1)
    target = torch.randint(0, 9, (2, 5), device=d)
    target[1, 2] = -100
    go = torch.randn(2, 5, device=d)
    check(s, t, target, grad_out=go, beta=beta, hard_weight=0.4, reduction="none")
    check(s, t, target, grad_out=torch.tensor(-2.5, device=d), beta=beta, hard_weight=0.4)


def test_non_contiguous(backend):
    d = backend.device
    base_s, base_t = logits(9, 2 * 21, device=d), logits(21, 9, device=d, seed=1)
    s = base_s[::2, ::2].reshape(5, 21)  # strided rows and classes
    t = base_t.t()[:5]  # classes 9 rows apart
    assert not s.is_contiguous() and not t.is_contiguous()
    target = torch.randint(0, 21, (10,), device=d)[::2]  # non-contiguous target
    for beta in [0.0, 1.0, 0.5]:
        check(s, t, target, beta=beta, temperature=2.0, hard_weight=0.5, reduction="none")
    s3 = logits(3, 2, 7, device=d).transpose(0, 1)  # leading dims that do not merge: copied
    check(s3, logits(2, 3, 7, device=d, seed=2), beta=0.3)


def test_teacher_dtype_converted(backend):
    d = backend.device
    s, t = logits(4, 30, device=d), logits(4, 30, dtype=torch.bfloat16, device=d, seed=1)
    check(s, t.float(), beta=0.5)
    torch.testing.assert_close(distillation_loss(s, t, beta=0.5),
                               distillation_loss(s, t.float(), beta=0.5))


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_inplace_backward(backend, beta):
    d = backend.device
    x = logits(8, 40, device=d).requires_grad_(True)
    t = logits(8, 40, device=d, seed=1)
    target = torch.randint(0, 40, (8,), device=d)
    target[2] = -100
    kw = dict(beta=beta, temperature=2.0, hard_weight=0.5)
    (gr,) = torch.autograd.grad(distillation_loss(x, t, target, **kw), x)
    student = x * 1.0  # a non-leaf, like the output of an LM head
    ptr = student.data_ptr()
    distillation_loss(student, t, target, inplace_backward=True, **kw).backward()
    torch.testing.assert_close(x.grad, gr, atol=1e-6, rtol=1e-5)
    assert student.data_ptr() == ptr
    torch.testing.assert_close(student.detach(), gr)  # the gradient was written over the logits
    # anything that saved the logits for its own backward now raises instead of going wrong
    y = x.exp()
    loss = distillation_loss(y, t, inplace_backward=True, **{k: v for k, v in kw.items()
                                                             if k != "hard_weight"})
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="leaf"):
        distillation_loss(x, t, inplace_backward=True)


def test_retain_graph():
    s, t = logits(4, 10).requires_grad_(True), logits(4, 10, seed=1)
    loss = distillation_loss(s, t, beta=0.5)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s, torch.tensor(2.0))
    torch.testing.assert_close(g2, 2 * g1)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(teacher_logits=torch.randn(4, 6)), ValueError, "teacher_logits must have"),
    (dict(teacher_logits=torch.randn(5, 4)), ValueError, "teacher_logits must have"),
    (dict(teacher_logits=torch.randn(4, 5, requires_grad=True)), ValueError,
     "teacher_logits requires grad"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(beta=-0.1), ValueError, "beta"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(hard_weight=-1.0), ValueError, "hard_weight"),
    (dict(hard_weight=1.0, target=None), ValueError, "hard_weight > 0 needs a target"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape"),
    (dict(target=torch.tensor([0, 1, 2, 3]).int()), TypeError, "target must hold int64"),
    (dict(target=torch.tensor([0, 1, 9, 2])), IndexError, "target 9 is out of bounds"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(student_logits=torch.tensor(1.0)), ValueError, "student_logits must have shape"),
    (dict(student_logits=torch.ones(4, 5, dtype=torch.long)), TypeError,
     "student_logits must be a floating"),
])
def test_bad_input(backend, kwargs, exc, match):
    args = dict(student_logits=logits(4, 5, device=backend.device),
                teacher_logits=logits(4, 5, device=backend.device, seed=1),
                target=torch.tensor([0, 1, 2, 3], device=backend.device))
    args.update({k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
                 for k, v in kwargs.items()})
    with pytest.raises(exc, match=match):
        distillation_loss(**args)


@pytest.mark.parametrize("beta, reduction", [(0.0, "batchmean"), (1.0, "none"), (0.3, "none")])
def test_gradcheck(backend, beta, reduction):
    d = backend.device
    s = logits(3, 5, dtype=torch.float64, device=d).requires_grad_(True)
    t = logits(3, 5, dtype=torch.float64, device=d, seed=1)
    target = torch.randint(0, 5, (3,), device=d)
    target[0] = -100
    assert torch.autograd.gradcheck(
        lambda s: distillation_loss(s, t, target, temperature=1.7, beta=beta, hard_weight=0.6,
                                    reduction=reduction), (s,))


def test_opcheck():
    s, t = logits(10, 13), logits(10, 13, seed=1)
    target = torch.randint(0, 13, (10,))
    target[3] = -100
    for ss, tt, tg, hw in [(s, t, None, 0.0), (s, t, target, 0.5), (s.bfloat16(), t.bfloat16(),
                                                                      target, 0.0),
                           (s.t().contiguous().t(), t[:, ::1], target, 0.2)]:
        for beta in [0.0, 1.0, 0.4]:
            args = (ss, tt, tg, 2.0, beta, -100, hw)
            opcheck(torch.ops.fusedloss.distill_fwd.default, args)
            _, stats = torch.ops.fusedloss.distill_fwd(*args)
            for scale in [torch.tensor([0.5]), torch.randn(10)]:
                bargs = (scale, ss, tt, tg, stats, 2.0, beta, -100, hw)
                opcheck(torch.ops.fusedloss.distill_bwd.default, bargs)
                opcheck(torch.ops.fusedloss.distill_bwd_inplace.default,
                        (scale, ss.clone(), *bargs[2:]))


def test_compile_fullgraph():
    torch._dynamo.reset()
    student, teacher = torch.nn.Linear(16, 300), torch.nn.Linear(16, 300)
    loss_fn = fusedloss.DistillationLoss(temperature=2.0, beta=0.5, hard_weight=0.3)

    def step(h, target):
        with torch.no_grad():
            t = teacher(h)
        return loss_fn(student(h), t, target)

    h, target = torch.randn(32, 16), torch.randint(0, 300, (32,))
    target[0] = -100
    assert_compiled_matches_eager(step, (h, target), student.weight)


def test_module():
    s, t = logits(6, 12), logits(6, 12, seed=1)
    target = torch.randint(0, 12, (6,))
    m = fusedloss.DistillationLoss(temperature=3.0, beta=0.2, hard_weight=0.5, reduction="sum")
    torch.testing.assert_close(m(s, t, target), distillation_loss(
        s, t, target, temperature=3.0, beta=0.2, hard_weight=0.5, reduction="sum"))
    assert "temperature=3.0" in repr(m) and "hard_weight=0.5" in repr(m)
    # forward KL at T = 1 is torch's kl_div(log_softmax(s), log_softmax(t), log_target=True)
    ref = F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), reduction="batchmean",
                   log_target=True)
    torch.testing.assert_close(fusedloss.DistillationLoss()(s, t), ref)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_reference_backend(monkeypatch, beta):
    """fusedloss.reference (the fallback without the C++ extension) through the functional."""
    from fusedloss import _backend
    monkeypatch.setattr(_backend, "_ENV", "reference")
    s, t = logits(3, 2, 9), logits(3, 2, 9, seed=1)
    target = torch.randint(0, 9, (3, 2))
    target[1, 1] = -100
    check(s, t, target, beta=beta, temperature=2.0, hard_weight=0.5, reduction="none")
    x = s.clone().requires_grad_(True) * 1.0
    distillation_loss(x, t, target, beta=beta, inplace_backward=True).backward()


def test_whole_loss_op():
    """fusedloss::distillation (the functional's one-call path on CPU tensors, autograd in C++):
    every reduction against the float64 reference, with and without targets (ignored rows
    included), 3-d logits, opcheck (gradcheck in fp64), bf16 with an fp32 result, and its checks."""
    op = torch.ops.fusedloss.distillation.default
    s, t = logits(6, 13, dtype=torch.float64), logits(6, 13, seed=1, dtype=torch.float64)
    target = torch.randint(0, 13, (6,))
    target[2] = -100
    for code, red in [(0, "none"), (1, "mean"), (2, "sum"), (3, "batchmean")]:
        for tg, hw, beta in [(None, 0.0, 0.0), (target, 0.5, 0.4)]:
            for ss, tt, gg in [(s, t, tg), (s.view(2, 3, 13), t.view(2, 3, 13),
                                            None if tg is None else tg.view(2, 3))]:
                x = ss.clone().requires_grad_()
                args = (x, tt, gg, 1.7, beta, -100, hw, code, torch.float64)
                got = op(*args)
                want = reference(x, tt, gg, temperature=1.7, beta=beta, reduction=red,
                                 hard_weight=hw)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
                go = torch.rand_like(want)
                torch.testing.assert_close(torch.autograd.grad(got, x, go),
                                           torch.autograd.grad(want, x, go), rtol=1e-9,
                                           atol=1e-12)
                opcheck(op, args)
        opcheck(op, (s.bfloat16().requires_grad_(), t.bfloat16(), target, 2.0, 0.0, -100, 0.3,
                     code, torch.float32))
    for bad in [(s, t, None, 0.0, 0.0, -100, 0.0, 3), (s, t, None, 1.0, 1.5, -100, 0.0, 3),
                (s, t, None, 1.0, 0.0, -100, 0.5, 3), (s, t[:, :5], None, 1.0, 0.0, -100, 0.0, 3),
                (s, t, target[:4], 1.0, 0.0, -100, 0.0, 3), (s, t, None, 1.0, 0.0, -100, 0.0, 4)]:
        with pytest.raises(RuntimeError, match="fusedloss::distillation"):
            op(*bad, torch.float64)
