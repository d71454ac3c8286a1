"""fusedloss.training: clipping against torch.nn.utils and direct implementations; TrainStep
against hand-written training loops (ordering with fp16 + GradScaler, accumulation, inf/NaN skip,
AGC, a real run on scikit-learn's digits). The DDP test lives in test_training_ddp.py."""
import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import fusedloss
from fusedloss import training as T

INF, NAN = float("inf"), float("nan")


# ----------------------------------------------------------------------------- helpers
def params_with_grads(shapes, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
        p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype)
        ps.append(p)
    return ps


SHAPES = [(7, 5), (5,), (), (3, 4, 2, 2), (0,), (129,)]


def ref_norm(tensors, p):
    flat = torch.cat([t.double().reshape(-1) for t in tensors])
    return torch.linalg.vector_norm(flat, p)


def mlp(seed=0, d_in=12, hidden=16, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def batches(n, size, d_in=12, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, d_in, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def assert_same_params(a, b, **tol):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if tol:
            torch.testing.assert_close(pa, pb, **tol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(pa, pb), name


def optimizer_state(opt):
    """A snapshot of every per-parameter optimizer state entry (step, momentum, moments)."""
    return {f"{i}.{k}": v.clone() if isinstance(v, torch.Tensor) else v
            for i, st in enumerate(opt.state.values()) for k, v in st.items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ----------------------------------------------------------------------------- functional layer
@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF, 3.0])
def test_global_norm_matches_reference_and_torch(norm_type):
    ps = params_with_grads(SHAPES)
    grads = [p.grad for p in ps]
    out = T.grad_norm(ps, norm_type)
    assert out.dtype == torch.float32 and out.ndim == 0
    torch.testing.assert_close(out.double(), ref_norm(grads, norm_type), rtol=1e-6, atol=0)
    nonempty = [g for g in grads if g.numel()]  # torch's inf norm rejects empty tensors
    theirs = torch.nn.utils.get_total_norm(nonempty, norm_type)
    torch.testing.assert_close(out, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(T.global_norm(grads, norm_type), out, rtol=0, atol=0)


def test_global_norm_many_small_tensors_and_mixed_dtypes():
    ps = params_with_grads([(3, 2)] * 2000, seed=3)
    ps += params_with_grads([(5,)] * 10, torch.bfloat16, seed=4)
    grads = [p.grad for p in ps]
    torch.testing.assert_close(T.grad_norm(ps).double(), ref_norm(grads, 2), rtol=1e-6, atol=0)


def test_global_norm_fp16_is_fp32():
    # ||g|| = 300 * 256 = 76800 > 65504: an fp16 norm overflows, the fp32 one must not.
    g = torch.full((256, 256), 300.0, dtype=torch.float16)
    out = T.global_norm([g, g[:0]])
    assert out.dtype == torch.float32
    # rtol: an fp32 sum of 65536 equal terms
    torch.testing.assert_close(out.double(), ref_norm([g], 2), rtol=1e-4, atol=0)


def test_global_norm_propagates_nonfinite_and_empty():
    ps = params_with_grads(SHAPES)
    ps[0].grad[1, 1] = INF
    assert T.grad_norm(ps).isinf()
    ps[1].grad[0] = NAN
    assert T.grad_norm(ps).isnan()
    assert T.grad_norm([]).item() == 0.0
    assert T.grad_norm([nn.Parameter(torch.ones(3))]).item() == 0.0  # no .grad: left out


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping active / inactive
@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_clip_grad_norm_matches_torch(max_norm, norm_type):
    shapes = [s for s in SHAPES if s != (0,)]  # torch's inf norm rejects empty tensors
    ours = params_with_grads(shapes, scale=2.0)
    theirs = params_with_grads(shapes, scale=2.0)
    n_ours = T.clip_grad_norm_(ours, max_norm, norm_type)
    n_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    torch.testing.assert_close(n_ours, n_theirs, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    coef = T.clip_coef(n_ours, max_norm)
    torch.testing.assert_close(coef, torch.clamp(max_norm / (n_ours + 1e-6), max=1.0))
    if max_norm < 1:
        after = T.grad_norm(ours, norm_type)
        torch.testing.assert_close(after, torch.tensor(max_norm), rtol=1e-5, atol=0)


def test_clip_grad_value_matches_torch():
    ours, theirs = params_with_grads(SHAPES, scale=2.0), params_with_grads(SHAPES, scale=2.0)
    T.clip_grad_value_(ours, 0.7)
    torch.nn.utils.clip_grad_value_(theirs, 0.7)
    assert any((p.grad.abs() == 0.7).any() for p in ours)  # the clamp was active
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


def test_scale_grads_by_tensor():
    ps = params_with_grads(SHAPES)
    before = [p.grad.clone() for p in ps]
    T.scale_grads_(ps, torch.tensor(0.25))
    for p, b in zip(ps, before):
        assert torch.equal(p.grad, b * 0.25)


def agc_direct(params, clipping, eps, exclude=()):
    """AGC written out unit by unit in float64 (NFNets' definition, PyTorch layout: a unit is a
    slice along dim 0; scalars and vectors are one unit)."""
    skip = {id(p) for p in exclude}
    out = []
    for p in params:
        w, g = p.detach().double(), p.grad.double().clone()
        if id(p) not in skip:
            units = [(...,)] if w.ndim <= 1 else [(i,) for i in range(w.shape[0])]
            for u in units:
                w_norm = math.sqrt(float((w[u] ** 2).sum()))
                g_norm = math.sqrt(float((g[u] ** 2).sum()))
                max_norm = clipping * max(w_norm, eps)
                if g_norm > max_norm:
                    g[u] = g[u] * (max_norm / max(g_norm, 1e-6))
        out.append(g)
    return out


@pytest.mark.parametrize("clipping", [0.01, 0.5])
def test_agc_matches_direct_implementation(clipping):
    shapes = [(6, 4), (6,), (3, 2, 3, 3), (), (5, 7)]
    ps = params_with_grads(shapes, scale=0.05, seed=5)
    ps[1].data.zero_()  # zero weights: the eps floor decides the bound
    ps[2].grad[0].mul_(1e-4)  # one conv unit far below its bound
    exclude = [ps[4]]
    expected = agc_direct(ps, clipping, 1e-3, exclude)
    before = [p.grad.clone() for p in ps]
    T.adaptive_clip_grad_(ps, clipping, 1e-3, exclude=exclude)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=1e-9)
    assert torch.equal(ps[4].grad, before[4])  # excluded
    changed = [not torch.equal(p.grad, b) for p, b in zip(ps, before)]
    assert any(changed[:4]) and torch.equal(ps[2].grad[0], before[2][0])  # some clipped, some not


def test_agc_exclude_accepts_modules():
    model = mlp()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    before = [p.grad.clone() for p in model[2].parameters()]
    T.adaptive_clip_grad_(model.parameters(), exclude=model[2])
    assert all(torch.equal(p.grad, b) for p, b in zip(model[2].parameters(), before))
    assert not torch.equal(model[0].weight.grad, model[0].weight.grad.clamp(-1e-9, 1e-9))


@pytest.mark.parametrize("call, match", [
    (lambda ps: T.grad_norm(ps, 0), "norm_type"),
    (lambda ps: T.grad_norm(ps, -2), "norm_type"),
    (lambda ps: T.grad_norm(ps, "fro"), "norm_type"),
    (lambda ps: T.global_norm([torch.ones(3, dtype=torch.int64)]), "floating"),
    (lambda ps: T.grad_norm(5), "parameters"),
    (lambda ps: T.grad_norm([1.0]), "parameters"),
    (lambda ps: T.clip_grad_norm_(ps, 0.0), "max_norm"),
    (lambda ps: T.clip_grad_norm_(ps, NAN), "max_norm"),
    (lambda ps: T.clip_grad_value_(ps, -1.0), "clip_value"),
    (lambda ps: T.adaptive_clip_grad_(ps, clipping=0), "clipping"),
    (lambda ps: T.adaptive_clip_grad_(ps, eps=-1), "eps"),
    (lambda ps: T.adaptive_clip_grad_(ps, exclude=["fc"]), "exclude"),
    (lambda ps: T.clip_coef(1.0, 1.0), "total_norm"),
])
def test_functional_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(params_with_grads(SHAPES))


# ----------------------------------------------------------------------------- TrainStep
def hand_step(model, opt, x, y, loss_fn, max_norm=None, scaler=None, amp_dtype=None):
    """The textbook loop: autocast forward, scaled backward, unscale_, clip, step, update."""
    with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = loss_fn(model(x), y)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm else INF)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def test_fp16_scaler_unscales_before_clipping():
    """fp16 + GradScaler: TrainStep's update equals unscale_-then-clip by hand, and differs from
    the classic bug (clipping the scaled gradient), so the comparison can tell them apart."""
    ce = fusedloss.CrossEntropyLoss()
    ours, hand, buggy = mlp(), mlp(), mlp()
    step = fusedloss.TrainStep(ours, torch.optim.SGD(ours.parameters(), lr=0.5), ce, clip="norm",
                               max_norm=0.1, amp_dtype=torch.float16)
    assert isinstance(step.scaler, torch.amp.GradScaler)
    opt_h, scaler_h = torch.optim.SGD(hand.parameters(), lr=0.5), torch.amp.GradScaler("cpu")
    opt_b, scaler_b = torch.optim.SGD(buggy.parameters(), lr=0.5), torch.amp.GradScaler("cpu")
    applied = 0
    for x, y in batches(6, 16):
        r = step(x, y)
        norm = hand_step(hand, opt_h, x, y, ce, 0.1, scaler_h, torch.float16)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ce(buggy(x), y)
        scaler_b.scale(loss).backward()
        torch.nn.utils.clip_grad_norm_(buggy.parameters(), 0.1)  # before unscale_: wrong
        scaler_b.step(opt_b)
        scaler_b.update()
        opt_b.zero_grad()
        # The first steps may overflow at the initial scale of 2**16; both loops skip those.
        assert r.stepped and bool(r.skipped) == (not torch.isfinite(norm))
        if r.skipped:
            continue
        applied += 1
        assert norm > 0.1  # clipping was active
        torch.testing.assert_close(r.grad_norm, norm, rtol=1e-6, atol=0)
        torch.testing.assert_close(r.clip_coef, 0.1 / (norm + 1e-6), rtol=1e-6, atol=0)
    assert applied >= 2
    assert_same_params(ours, hand, rtol=1e-6, atol=1e-7)
    assert step.scaler.get_scale() == scaler_h.get_scale()
    with pytest.raises(AssertionError):
        assert_same_params(ours, buggy, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_matches_hand_loop(amp_dtype):
    ce = fusedloss.CrossEntropyLoss()
    ours, hand = mlp(), mlp()
    step = fusedloss.TrainStep(ours, torch.optim.Adam(ours.parameters(), lr=1e-2), ce, clip="norm",
                               max_norm=0.5, amp_dtype=amp_dtype)
    opt_h = torch.optim.Adam(hand.parameters(), lr=1e-2)
    for p in ours.parameters():
        p.grad = torch.full_like(p, 100.0)  # stale gradients must not leak into the first step
    for x, y in batches(4, 16):
        r = step(x, y)
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = ce(hand(x), y)
        assert torch.equal(r.loss, loss.detach())
        assert r.accum_loss == r.loss
        hand_step(hand, opt_h, x, y, ce, 0.5, None, amp_dtype)
    assert_same_params(ours, hand, rtol=1e-6, atol=1e-7)


def grads_the_optimizer_sees(model, opt):
    """A list filled, at every optimizer.step(), with float64 copies of the parameters' gradients
    and values: what the update actually used, after TrainStep's clipping."""
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append(
        [(p.grad.double().clone(), p.detach().double().clone()) for p in model.parameters()]))
    return seen


def unclipped_grads(model, x, y, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    grads = [p.grad.double().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF])
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_norm_clipping_leaves_max_norm(norm_type, accum_steps):
    """The gradient the optimizer steps with has global norm max_norm (the pre-clip norm was far
    above it), points the same way as the unclipped one, and the result reports both norms."""
    ce = fusedloss.CrossEntropyLoss()
    model, max_norm = mlp(), 0.02
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = grads_the_optimizer_sees(model, opt)
    step = fusedloss.TrainStep(model, opt, ce, accum_steps=accum_steps, max_norm=max_norm,
                               norm_type=norm_type)
    assert step.clip == "norm"  # inferred from max_norm, as clip_grad_norm_ takes it
    for i, (x, y) in enumerate(batches(3, 16 * accum_steps)):
        full = unclipped_grads(model, x, y, ce)  # the window's gradient: its mean over rows
        for xm, ym in zip(x.chunk(accum_steps), y.chunk(accum_steps)):
            r = step(xm, ym)
        assert r.stepped and len(seen) == i + 1
        grads = [g for g, _ in seen[-1]]
        before, after = ref_norm(full, norm_type), ref_norm(grads, norm_type)
        assert before > 2 * max_norm  # clipping had work to do
        coef = max_norm / (before + 1e-6)  # torch's definition: the norm lands a hair below
        torch.testing.assert_close(r.grad_norm.double(), before, rtol=1e-6, atol=0)
        torch.testing.assert_close(after, before * coef, rtol=1e-6, atol=0)
        torch.testing.assert_close(after, torch.tensor(max_norm, dtype=torch.float64),
                                   rtol=1e-6 / max_norm, atol=0)
        torch.testing.assert_close(r.clip_coef.double(), coef, rtol=1e-6, atol=0)
        for g, f in zip(grads, full):  # scaled, not clamped: the direction is kept
            torch.testing.assert_close(g, f * coef, rtol=1e-5, atol=1e-9)


def test_value_clipping_bounds_every_element():
    ce = fusedloss.CrossEntropyLoss()
    model, clip_value = mlp(), 0.01
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = grads_the_optimizer_sees(model, opt)
    step = fusedloss.TrainStep(model, opt, ce, clip_value=clip_value)
    assert step.clip == "value"
    for x, y in batches(3, 16):
        full = unclipped_grads(model, x, y, ce)
        r = step(x, y)
        grads = [g for g, _ in seen[-1]]
        assert max(f.abs().max() for f in full) > 4 * clip_value  # clipping had work to do
        bound = torch.tensor(clip_value).item()  # clip_value as the fp32 gradients hold it
        assert max(g.abs().max() for g in grads) == bound  # reached exactly, never passed
        for g, f in zip(grads, full):  # clamped element-wise; the small ones are untouched
            torch.testing.assert_close(g, f.clamp(-bound, bound), rtol=1e-6, atol=0)
        torch.testing.assert_close(r.clip_coef.double(),
                                   ref_norm(grads, 2) / ref_norm(full, 2), rtol=1e-5, atol=0)


def unit_norms(t):
    """float64 L2 norm of each AGC unit: the whole tensor if ndim <= 1, else each dim-0 slice."""
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)))


def test_agc_clipping_bounds_every_unit():
    """Every unit's gradient norm is at most clipping * max(||W_unit||, eps) and equal to it
    where the bound was exceeded; the excluded final layer keeps its gradient."""
    ce = fusedloss.CrossEntropyLoss()
    model, clipping, eps = mlp(), 0.02, 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = grads_the_optimizer_sees(model, opt)
    step = fusedloss.TrainStep(model, opt, ce, agc_clipping=clipping, agc_exclude=model[2])
    assert step.clip == "agc"
    clipped_units = 0
    for x, y in batches(3, 16):
        full = unclipped_grads(model, x, y, ce)
        step(x, y)
        for (g, w), f, name in zip(seen[-1], full, [n for n, _ in model.named_parameters()]):
            if name.startswith("2."):
                torch.testing.assert_close(g, f, rtol=0, atol=0)  # excluded
                continue
            bound = unit_norms(w).clamp_min(eps) * clipping
            g_norm, f_norm = unit_norms(g), unit_norms(f)
            over = f_norm > bound
            clipped_units += int(over.sum())
            assert (g_norm <= bound * (1 + 1e-6)).all(), name
            torch.testing.assert_close(torch.where(over, g_norm, bound), bound,
                                       rtol=1e-6, atol=0)  # the clipped ones sit on the bound
            torch.testing.assert_close(torch.where(over, f_norm, g_norm), f_norm,
                                       rtol=0, atol=0)  # the others are untouched
    assert clipped_units > 0


@pytest.mark.parametrize("clip", [None, "norm"])
def test_accumulation_equals_big_batch(clip):
    """k micro-batches of size b give the update (and the reported norm and loss) of one batch of
    size k*b; the reported norm would be k times off with a missing 1/k."""
    k, b = 4, 8
    ce = fusedloss.CrossEntropyLoss()
    acc, big = mlp(), mlp()
    kw = dict(clip=clip, max_norm=0.3 if clip else None)
    s_acc = fusedloss.TrainStep(acc, torch.optim.SGD(acc.parameters(), lr=0.3, momentum=0.9), ce,
                                accum_steps=k, **kw)
    s_big = fusedloss.TrainStep(big, torch.optim.SGD(big.parameters(), lr=0.3, momentum=0.9), ce,
                                **kw)
    data = batches(3 * k, b)
    for i in range(3):
        window = data[i * k:(i + 1) * k]
        results = [s_acc(x, y) for x, y in window]
        assert [r.stepped for r in results] == [False] * (k - 1) + [True]
        assert all(r.grad_norm is None for r in results[:-1])
        r_big = s_big(torch.cat([x for x, _ in window]), torch.cat([y for _, y in window]))
        torch.testing.assert_close(results[-1].grad_norm, r_big.grad_norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(results[-1].accum_loss, r_big.loss, rtol=1e-6, atol=0)
    assert_same_params(acc, big, rtol=1e-5, atol=1e-6)
    assert s_acc.steps == s_big.steps == 3


def test_accumulation_summed_loss_num_items():
    """Summed losses with ignored tokens and uneven valid counts: passing num_items gives the mean
    over all valid tokens of the window, i.e. one big batch with reduction='mean'."""
    k = 3
    acc, big = mlp(), mlp()
    s_acc = fusedloss.TrainStep(acc, torch.optim.SGD(acc.parameters(), lr=0.5),
                                fusedloss.CrossEntropyLoss(reduction="sum"), accum_steps=k)
    s_big = fusedloss.TrainStep(big, torch.optim.SGD(big.parameters(), lr=0.5),
                                fusedloss.CrossEntropyLoss())
    data = batches(2 * k, 10, seed=7)
    for j, (x, y) in enumerate(data):
        y[: 2 * (j % k) + 1] = -100  # 1, 3 and 5 ignored targets per micro-batch
    for i in range(2):
        window = data[i * k:(i + 1) * k]
        for x, y in window:
            r = s_acc(x, y, num_items=(y != -100).sum())
        r_big = s_big(torch.cat([x for x, _ in window]), torch.cat([y for _, y in window]))
        torch.testing.assert_close(r.grad_norm, r_big.grad_norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(r.accum_loss, r_big.loss, rtol=1e-6, atol=0)
    assert_same_params(acc, big, rtol=1e-5, atol=1e-6)


def test_num_items_all_or_nothing():
    model = mlp()
    step = fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               fusedloss.CrossEntropyLoss(reduction="sum"), accum_steps=2)
    (x, y), = batches(1, 4)
    step(x, y, num_items=4)
    with pytest.raises(ValueError, match="num_items"):
        step(x, y)
    with pytest.raises(ValueError, match="num_items"):
        step(x, y, num_items=torch.ones(2))


def test_num_items_window_without_items_is_skipped():
    model = mlp()
    step = fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               fusedloss.CrossEntropyLoss(reduction="sum"), accum_steps=2)
    params = copy.deepcopy(model.state_dict())
    for x, y in batches(2, 4):
        y.fill_(-100)  # nothing to learn from: 0 / 0
        r = step(x, y, num_items=(y != -100).sum())
    assert r.skipped and step.skipped_steps.item() == 1
    assert_same_state(params, model.state_dict())


class NoSyncRecorder(nn.Module):
    """Stands in for DDP: records whether each forward ran inside no_sync()."""

    def __init__(self, module):
        super().__init__()
        self.module, self.inside, self.log = module, False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, x):
        self.log.append(self.inside)
        return self.module(x)


def test_no_sync_on_non_boundary_micro_steps():
    model = NoSyncRecorder(mlp())
    step = fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               fusedloss.CrossEntropyLoss(), accum_steps=3)
    for x, y in batches(6, 4):
        step(x, y)
    assert model.log == [True, True, False] * 2


def poison_hook(state, value):
    """Gradient hook that plants `value` in one element while state['on'] is set."""
    def hook(g):
        if not state["on"]:
            return g
        g = g.clone()
        g.view(-1)[0] = value
        return g
    return hook


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),  # skips on the device
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("value", [INF, NAN])
@pytest.mark.parametrize("clip", ["norm", "value", "agc"])
def test_nonfinite_gradient_skips_step(opt_name, value, clip):
    """A planted inf/NaN skips the step: parameters and optimizer state stay bit-identical (value
    clipping would turn an inf into a finite number, so the decision must come before it)."""
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    state = {"on": False}
    model[2].weight.register_hook(poison_hook(state, value))
    threshold = {"norm": dict(max_norm=1.0), "value": dict(clip_value=0.1), "agc": {}}[clip]
    step = fusedloss.TrainStep(model, opt, fusedloss.CrossEntropyLoss(), clip=clip, **threshold,
                               max_consecutive_skips=5)
    data = batches(4, 8)
    for x, y in data[:2]:
        assert not step(x, y).skipped
    params, opt_state = copy.deepcopy(model.state_dict()), optimizer_state(opt)
    state["on"] = True
    r = step(*data[2])
    assert r.skipped and not torch.isfinite(r.grad_norm)
    assert_same_state(params, model.state_dict())
    assert_same_state(opt_state, optimizer_state(opt))
    assert step.consecutive_skips.item() == 1 and step.skipped_steps.item() == 1
    state["on"] = False
    assert not step(*data[3]).skipped
    assert step.consecutive_skips.item() == 0 and step.skipped_steps.item() == 1
    assert not torch.equal(params["2.weight"], model.state_dict()["2.weight"])


@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam-fused"])
def test_nonfinite_under_fp16_backs_off_the_scale(opt_name):
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    state = {"on": True}
    model[0].bias.register_hook(poison_hook(state, INF))
    step = fusedloss.TrainStep(model, opt, fusedloss.CrossEntropyLoss(), amp_dtype=torch.float16)
    scale = step.scaler.get_scale()
    params = copy.deepcopy(model.state_dict())
    assert step(*batches(1, 8)[0]).skipped
    assert_same_state(params, model.state_dict())
    assert step.scaler.get_scale() == scale * 0.5 and step.skipped_steps.item() == 1
    state["on"] = False
    for x, y in batches(3, 8):  # overflow at 2**15 is possible: all that matters is recovery
        step(x, y)
    assert not torch.equal(params["0.bias"], model.state_dict()["0.bias"])


@pytest.mark.parametrize("opt_name", ["adam", "adam-fused"])
def test_consecutive_skip_limit(opt_name):
    model = mlp()
    state = {"on": True}
    model[2].bias.register_hook(poison_hook(state, NAN))
    step = fusedloss.TrainStep(model, OPTIMIZERS[opt_name](model.parameters()),
                               fusedloss.CrossEntropyLoss(), max_consecutive_skips=3)
    data = batches(8, 4)
    step(*data[0])
    step(*data[1])
    state["on"] = False
    step(*data[2])  # a good step resets the run
    state["on"] = True
    step(*data[3])
    step(*data[4])
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row .*max_consecutive_skips=3"):
        step(*data[5])
    assert step.skipped_steps.item() == 5


def test_scheduler_steps_once_per_boundary():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    step = fusedloss.TrainStep(model, opt, fusedloss.CrossEntropyLoss(), accum_steps=2,
                               scheduler=sched)
    for x, y in batches(6, 4):
        step(x, y)
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == 0.125


def test_agc_in_train_step_matches_functional():
    ce = fusedloss.CrossEntropyLoss()
    ours, hand = mlp(), mlp()
    step = fusedloss.TrainStep(ours, torch.optim.SGD(ours.parameters(), lr=0.5), ce, clip="agc",
                               agc_clipping=0.02, agc_exclude=[ours[2]])
    opt_h = torch.optim.SGD(hand.parameters(), lr=0.5)
    for x, y in batches(3, 16):
        r = step(x, y)
        ce(hand(x), y).backward()
        norm = T.grad_norm(hand.parameters())
        T.adaptive_clip_grad_(hand.parameters(), 0.02, exclude=[hand[2]])
        torch.testing.assert_close(r.grad_norm, norm, rtol=0, atol=0)
        torch.testing.assert_close(r.clip_coef, T.grad_norm(hand.parameters()) / norm)
        assert r.clip_coef < 1  # AGC was active
        opt_h.step()
        opt_h.zero_grad()
    assert_same_params(ours, hand)


def test_state_dict_round_trip():
    model = mlp()
    state = {"on": True}
    model[2].bias.register_hook(poison_hook(state, INF))
    kw = dict(accum_steps=2, amp_dtype=torch.float16)
    step = fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               fusedloss.CrossEntropyLoss(), **kw)
    data = batches(5, 4)
    for x, y in data[:4]:
        step(x, y)
    sd = step.state_dict()
    assert sd["steps"] == 2
    assert sd["consecutive_skips"].item() == 2 and sd["skipped_steps"].item() == 2
    step(*data[4])
    with pytest.raises(RuntimeError, match="accumulation window"):
        step.state_dict()
    fresh = fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                fusedloss.CrossEntropyLoss(), **kw)
    fresh.load_state_dict(sd)
    assert fresh.state_dict()["steps"] == 2 and fresh.scaler.get_scale() == 2.0 ** 14
    assert fresh.consecutive_skips.item() == 2 and fresh.skipped_steps.item() == 2
    no_scaler = fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    fusedloss.CrossEntropyLoss())
    with pytest.raises(ValueError, match="scaler"):
        no_scaler.load_state_dict(sd)
    with pytest.raises(KeyError, match="steps"):
        fresh.load_state_dict({})


@pytest.mark.parametrize("kwargs, match", [
    (dict(accum_steps=0), "accum_steps"),
    (dict(accum_steps=2.0), "accum_steps"),
    (dict(clip="l2"), "clip"),
    (dict(clip=["norm"]), "clip"),
    (dict(clip="norm"), "max_norm"),
    (dict(clip="norm", max_norm=-1.0), "max_norm"),
    (dict(clip="value"), "clip_value"),
    (dict(clip="agc", agc_clipping=0.0), "agc_clipping"),
    (dict(agc_exclude=[nn.Parameter(torch.ones(1))]), "agc_exclude"),
    (dict(norm_type=0), "norm_type"),
    (dict(amp_dtype=torch.float64), "amp_dtype"),
    (dict(max_consecutive_skips=0), "max_consecutive_skips"),
    (dict(scheduler=object()), "scheduler"),
])
def test_train_step_bad_arguments(kwargs, match):
    model = mlp()
    with pytest.raises((TypeError, ValueError), match=match):
        fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            fusedloss.CrossEntropyLoss(), **kwargs)


@pytest.mark.parametrize("kwargs, mode", [
    ({}, None),
    (dict(max_norm=1.0), "norm"),
    (dict(max_norm=1.0, norm_type=INF), "norm"),
    (dict(norm_type=1.0), None),  # norm_type also sets the measured norm: no clipping implied
    (dict(clip_value=0.5), "value"),
    (dict(agc_clipping=0.05), "agc"),
    (dict(agc_exclude=[0]), "agc"),  # [0]: index into the model, resolved below
    (dict(clip=None), None),
    (dict(clip="agc"), "agc"),
    (dict(clip="norm", max_norm=2.0), "norm"),
])
def test_clip_mode_inferred_from_its_option(kwargs, mode):
    model = mlp()
    if "agc_exclude" in kwargs:
        kwargs = dict(agc_exclude=model[2])
    step = fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               fusedloss.CrossEntropyLoss(), **kwargs)
    assert step.clip == mode


@pytest.mark.parametrize("kwargs, names", [
    (dict(clip="value", clip_value=0.1, max_norm=1.0), ["max_norm", "clip='value'"]),
    (dict(clip="norm", max_norm=1.0, clip_value=0.1), ["clip_value", "clip='norm'"]),
    (dict(clip="norm", max_norm=1.0, agc_eps=1e-2), ["agc_eps", "clip='norm'"]),
    (dict(clip="agc", max_norm=1.0), ["max_norm", "clip='agc'"]),
    (dict(clip=None, max_norm=1.0), ["max_norm", "clip=None"]),
    (dict(max_norm=1.0, clip_value=0.1), ["max_norm", "clip_value", "clip='auto'"]),
    (dict(clip_value=0.1, agc_clipping=0.01), ["clip_value", "agc_clipping", "clip='auto'"]),
])
def test_clip_mode_conflicts_name_both(kwargs, names):
    """A threshold that the clip mode would not use is an error naming it and `clip`, never a
    silently unclipped (or differently clipped) step."""
    model = mlp()
    with pytest.raises(ValueError) as err:
        fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                            fusedloss.CrossEntropyLoss(), **kwargs)
    for name in names:
        assert name in str(err.value), (name, str(err.value))


def test_train_step_bad_objects_and_loss():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model"):
        fusedloss.TrainStep(lambda x: x, opt, fusedloss.CrossEntropyLoss())
    with pytest.raises(TypeError, match="optimizer"):
        fusedloss.TrainStep(model, None, fusedloss.CrossEntropyLoss())
    with pytest.raises(TypeError, match="loss_fn"):
        fusedloss.TrainStep(model, opt, "ce")
    step = fusedloss.TrainStep(model, opt, fusedloss.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="loss_fn must return a 0-d tensor"):
        step(*batches(1, 4)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_with_fused_optimizer_on_cuda():
    """With a fused optimizer, neither micro-steps nor boundaries sync with the host: CUDA's sync
    debug mode turns any sync into an error. (torch's cross-entropy here: fusedloss's eager CUDA
    path reads the targets for its range check, by design.)"""
    model = mlp().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    step = fusedloss.TrainStep(model, opt, nn.functional.cross_entropy, accum_steps=2, clip="norm",
                               max_norm=0.5, amp_dtype=torch.bfloat16)
    data = [(x.cuda(), y.cuda()) for x, y in batches(6, 8)]
    for x, y in data[:2]:  # warm-up: optimizer state, kernels, allocator
        step(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [step(x, y) for x, y in data[2:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [r.stepped for r in results] == [False, True, False, True]
    assert not results[-1].skipped and torch.isfinite(results[-1].grad_norm)


# ----------------------------------------------------------------------------- a real run
def digits_split():
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1536], y[:1536]), (x[1536:], y[1536:])


def test_digits_training_run_matches_hand_loop():
    """An MLP on scikit-learn's digits: with TrainStep (accumulation 2, norm clipping, warm-up
    schedule) the loss falls and test accuracy is high, and the parameters equal those of the
    same loop written by hand with torch.nn.utils.clip_grad_norm_."""
    (x, y), (x_test, y_test) = digits_split()
    ce = fusedloss.CrossEntropyLoss()

    def make(seed=0):
        model = mlp(seed, d_in=64, hidden=64, classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))

    model, opt, sched = make()
    step = fusedloss.TrainStep(model, opt, ce, accum_steps=2, clip="norm", max_norm=1.0,
                               scheduler=sched)
    hand, opt_h, sched_h = make()
    losses = []
    for epoch in range(3):
        for i in range(0, len(y), 64):
            for j in (i, i + 32):  # micro-batches of 32, steps of 64
                r = step(x[j:j + 32], y[j:j + 32])
            losses.append(r.accum_loss)
            for j in (i, i + 32):
                (ce(hand(x[j:j + 32]), y[j:j + 32]) / 2).backward()
            torch.nn.utils.clip_grad_norm_(hand.parameters(), 1.0)
            opt_h.step()
            sched_h.step()
            opt_h.zero_grad()
    losses = torch.stack(losses)
    first, last = losses[:5].mean().item(), losses[-24:].mean().item()  # 24 steps an epoch
    assert last < 0.15 * first, (first, last)
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.9, accuracy
    assert_same_params(model, hand, rtol=1e-4, atol=1e-6)
