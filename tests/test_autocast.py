"""Under torch.autocast every loss returns the dtype torch's returns (fp32 for a half-precision
input: all of them are on autocast's fp32 list), with the value computed in fp32 from the
half-precision input as read (not rounded to 3 digits), and the gradient in the input's dtype."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as TF

from fusedloss import functional as F
from fusedloss.reference import torchvision_sigmoid_focal_loss

# name -> (fusedloss call, torch's call, float64 reference), on (x, t, y): logits, class indices
# and soft targets; the torch call gives the dtype, the float64 reference the value.


def _focal64(x, t):
    lp = torch.log_softmax(x, -1).gather(1, t[:, None])[:, 0]
    return (-(-torch.expm1(lp)) ** 2 * lp).mean()


CASES = {
    "cross_entropy": (lambda x, t, y: F.cross_entropy(x, t, label_smoothing=0.1),
                      lambda x, t, y: TF.cross_entropy(x, t, label_smoothing=0.1)),
    "cross_entropy none": (lambda x, t, y: F.cross_entropy(x, t, reduction="none"),
                           lambda x, t, y: TF.cross_entropy(x, t, reduction="none")),
    "cross_entropy probs": (lambda x, t, y: F.cross_entropy(x, y),
                            lambda x, t, y: TF.cross_entropy(x, y)),
    "bce": (lambda x, t, y: F.binary_cross_entropy_with_logits(x, y),
            lambda x, t, y: TF.binary_cross_entropy_with_logits(x, y)),
    "huber": (lambda x, t, y: F.huber_loss(x, y, delta=0.5),
              lambda x, t, y: TF.huber_loss(x, y, delta=0.5)),
    "smooth_l1 none": (lambda x, t, y: F.smooth_l1_loss(x, y, reduction="none"),
                       lambda x, t, y: TF.smooth_l1_loss(x, y, reduction="none")),
    "sigmoid_focal": (lambda x, t, y: F.sigmoid_focal_loss(x, y, reduction="mean"),
                      lambda x, t, y: torchvision_sigmoid_focal_loss(x, y).mean()),
    # softmax focal has no torch counterpart: it follows cross_entropy (same op list)
    "softmax_focal": (lambda x, t, y: F.softmax_focal_loss(x, t),
                      lambda x, t, y: TF.cross_entropy(x, t)),
}


def _reference(name, x, t, y):
    """The loss in float64 on the same (half-precision) values."""
    if name == "softmax_focal":
        return _focal64(x, t)
    if name == "sigmoid_focal":
        q = y * torch.sigmoid(-x) + (1 - y) * torch.sigmoid(x)
        loss = TF.binary_cross_entropy_with_logits(x, y, reduction="none") * q ** 2
        return ((0.25 * y + 0.75 * (1 - y)) * loss).mean()
    return CASES[name][1](x, t, y)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_autocast_dtype_and_value(backend, name, dtype, amp):
    if backend.interpreted and dtype != amp:
        pytest.skip("the interpreter is slow: one input dtype per autocast dtype there")
    d = backend.device
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 9, generator=g) * 3).to(device=d, dtype=dtype)
    t = torch.randint(0, 9, (6,), generator=g).to(d)
    y = torch.rand(6, 9, generator=g).to(device=d, dtype=dtype)
    ours_fn, torch_fn = CASES[name]
    xa = x.clone().requires_grad_(True)
    with torch.autocast(d.type, dtype=amp):
        ours = ours_fn(xa, t, y)
        theirs = torch_fn(x, t, y)
    assert ours.dtype == theirs.dtype, f"{name}: {ours.dtype}, torch {theirs.dtype}"
    assert ours.shape == theirs.shape
    x64 = x.double().requires_grad_(True)
    ref = _reference(name, x64, t, y.double())
    # fp32 math on the half-precision values: fp32-level agreement, far below a half rounding
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), xa)
    (g_ref,) = torch.autograd.grad(ref.sum(), x64)
    assert g_ours.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else (1e-2 if dtype == torch.bfloat16 else 2e-3)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=tol, atol=tol * g_ref.abs().max())


def test_autocast_fp64_unchanged(backend):
    """fp64 is not cast by autocast: the loss stays fp64."""
    x = torch.randn(4, 5, dtype=torch.float64, device=backend.device)
    t = torch.tensor([0, 1, 2, 3], device=backend.device)
    with torch.autocast(backend.device.type, dtype=torch.bfloat16):
        assert F.cross_entropy(x, t).dtype == torch.float64
        assert F.huber_loss(x, x * 2).dtype == torch.float64


def test_autocast_under_compile():
    """torch.compile(fullgraph=True) sees the autocast state: fp32 loss, bf16 gradient."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 11)

    def step(h, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(lin(h), t, label_smoothing=0.1)

    h, t = torch.randn(5, 8), torch.randint(0, 11, (5,))
    eager = step(h, t)
    compiled = torch.compile(step, fullgraph=True)(h, t)
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)


def test_autocast_vocab_parallel(tmp_path):
    """vocab_parallel_cross_entropy follows cross_entropy (world size 1, gloo)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        x = (torch.randn(6, 9) * 3).bfloat16().requires_grad_(True)
        t = torch.randint(0, 9, (6,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = F.vocab_parallel_cross_entropy(x, t)
            theirs = TF.cross_entropy(x, t)
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours.double(), TF.cross_entropy(x.double(), t), rtol=2e-6,
                                   atol=0)
        ours.backward()
        assert x.grad.dtype == torch.bfloat16
    finally:
        dist.destroy_process_group()
