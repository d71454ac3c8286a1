"""Test set-up: every loss is tested on each backend.

Without CUDA the Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which must be set
before triton kernels are decorated, i.e. before `import fusedloss`. With CUDA they run on the GPU.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedloss  # noqa: E402,F401
from fusedloss import _backend  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


class Backend:
    """A backend under test: FUSEDLOSS_BACKEND value (None = by device) and the tensor device."""

    def __init__(self, name, env, device):
        self.name, self.env, self.device = name, env, torch.device(device)

    @property
    def interpreted(self) -> bool:
        """Triton under the interpreter: slow, so tests keep its shapes small."""
        return self.env == "triton" and self.device.type == "cpu"

    def __repr__(self):
        return self.name


BACKENDS = [
    pytest.param(Backend("cpp", "cpp", "cpu"), id="cpp"),
    pytest.param(Backend("triton", "triton", "cuda" if HAS_CUDA else "cpu"), id="triton"),
    # The registered op on CUDA tensors (dispatches to the Triton kernel): what torch.compile sees.
    pytest.param(Backend("cuda-op", None, "cuda"), id="cuda-op", marks=requires_cuda),
]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state: a result never depends on test order
    (random grad_outputs and inputs drawn without a generator)."""
    torch.manual_seed(0)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend; FUSEDLOSS_BACKEND is overridden for its duration."""
    be = request.param
    monkeypatch.setattr(_backend, "_ENV", be.env or "")
    return be


# Margins of the true class over the others at which torch's fp32 loss and target gradient lose
# all their digits (lse - x_y and p_y - 1 cancel); fusedloss keeps 1e-4 relative error. (Past a
# margin of ~80 the terms exp(x_j - m) fall below fp32's normal range and are flushed to 0.)
MARGINS = [10.0, 14.0, 17.0, 20.0, 30.0, 45.0, 60.0]


def confident_rows(n, C, margin, seed=0):
    """fp32 logits whose target column leads the row's max by `margin`, and the targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, C, (n,), generator=g)
    x[torch.arange(n), t] = x.max(1).values + margin + torch.rand(n, generator=g, dtype=torch.float64)
    return x.float(), t


def assert_rel(actual, expected, rtol, what):
    """Each element within rtol of float64 `expected` (values below fp32's normal range: absolute)."""
    err = (actual.double() - expected).abs()
    bound = rtol * expected.abs() + 2e-38
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: worst element at {worst:.3g} x the bound {rtol} (relative)"


def assert_compiled_matches_eager(step, args, param):
    """torch.compile(step, fullgraph=True) (no graph break through the ops) gives eager's value
    of step(*args) and eager's gradient with respect to param."""
    (g_eager,) = torch.autograd.grad(step(*args), param)
    out = torch.compile(step, fullgraph=True)(*args)
    (g,) = torch.autograd.grad(out, param)
    torch.testing.assert_close(out, step(*args))
    torch.testing.assert_close(g, g_eager)


# Per-element bound of the C++ element-wise loops against float64 on the same (rounded) inputs:
# the output's own rounding (relative) plus fp32 math error on the terms (absolute, scaled by the
# largest value: differences of terms such as BCE's gradient at y = sigmoid(x) cancel).
_EW_REL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.bfloat16: 2.0 ** -8,
           torch.float16: 2.0 ** -10}


def check_elementwise_runs(ours, ref, x, y, wrt_y=True, threads=(1, 2), **kw):
    """ours(x, y, **kw) vs ref in float64 at every reduction, element by element, loss and the
    gradients (input and target, then target alone), on each thread count; the reduced loss
    within 1e-5 relative (fp32 accumulation whatever the dtype; plus one rounding when returned
    in half precision) and bitwise the same on every thread count. x, y: CPU tensors in the dtype under test, whatever layout."""
    rel = _EW_REL[x.dtype]
    n0 = torch.get_num_threads()
    try:
        for reduction in ("none", "mean", "sum"):
            sums = []
            for th in threads:
                torch.set_num_threads(th)
                for want_x, want_y in ((True, wrt_y), (False, True)) if wrt_y else ((True, False),):
                    xa = x.detach().requires_grad_(want_x)  # views: the layout under test
                    ya = y.detach().requires_grad_(want_y)
                    xr = x.detach().double().requires_grad_(want_x)
                    yr = y.detach().double().requires_grad_(want_y)
                    out = ours(xa, ya, reduction=reduction, **kw)
                    want = ref(xr, yr, reduction=reduction,
                               **{k: v.double() if isinstance(v, torch.Tensor) else v
                                  for k, v in kw.items()})
                    if reduction == "none":
                        fi = torch.finfo(out.dtype)
                        bound = rel * want.abs() + 1e-5 * want.abs().max() + fi.tiny * fi.eps
                        assert ((out.double() - want).abs() <= bound).all(), reduction
                    else:
                        # fp32 accumulation; a half-precision result is then rounded once
                        rtol = max(1e-5, _EW_REL[out.dtype]) if out.dtype.itemsize == 2 else 1e-5
                        torch.testing.assert_close(out.double(), want.detach(), rtol=rtol,
                                                   atol=1e-30)
                        sums.append(out.detach().clone())
                    go = (torch.rand(want.shape, generator=torch.Generator().manual_seed(3),
                                     dtype=torch.float64) + 0.5).to(out.dtype).double()
                    wrt_a = [t for t, f in ((xa, want_x), (ya, want_y)) if f]
                    wrt_r = [t for t, f in ((xr, want_x), (yr, want_y)) if f]
                    got = torch.autograd.grad(out, wrt_a, go.to(out.dtype))
                    exp = torch.autograd.grad(want, wrt_r, go)
                    for a, b in zip(got, exp):
                        assert a.dtype == x.dtype and a.shape == b.shape
                        # (+ one subnormal step: fp16's mean gradients of 1e-5 are subnormal)
                        fi = torch.finfo(a.dtype)
                        bound = rel * b.abs() + 1e-5 * b.abs().max() + fi.tiny * fi.eps
                        err = (a.double() - b).abs()
                        assert (err <= bound).all(), (reduction, th, (err / bound).max().item())
            assert all(torch.equal(s, sums[0]) for s in sums), "reduced loss depends on threads"
    finally:
        torch.set_num_threads(n0)
