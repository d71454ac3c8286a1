"""Backend selection: the package imports without the C++ extension and falls back, with one
warning, to the reference implementation; FUSEDLOSS_BACKEND is validated; use_backend() overrides
it for a block (backward included) and backends() reports what runs where."""
import collections
import os
import subprocess
import sys

import pytest
import torch

import fusedloss
from fusedloss import _backend, reference

SCRIPT = r"""
import sys, warnings
class Block:  # make `import fusedloss._C` fail, as on a machine where it was never built
    def find_spec(self, name, path=None, target=None):
        if name == "fusedloss._C":
            raise ImportError("fusedloss._C blocked for the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, torch.nn.functional as F
    import fusedloss
    x = torch.randn(5, 7, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, -100])
    loss = fusedloss.CrossEntropyLoss()(x, t)
    loss.backward()
    import fusedloss.focal, fusedloss.bce  # other losses import too
mine = [w for w in caught if "fusedloss._C" in str(w.message)]
assert len(mine) == 1, [str(w.message) for w in caught]
assert fusedloss._backend.backend_for(x) == "reference"
report = fusedloss.backends()
assert report["cpu"] == "reference", report
assert "FUSEDLOSS_JIT=0" in report.reasons["cpu"], report
xr = x.detach().double().requires_grad_(True)
ref = F.cross_entropy(xr, t)
ref.backward()
assert abs(loss.item() - ref.item()) < 1e-5
assert (x.grad.double() - xr.grad).abs().max() < 1e-6
print("OK")
"""


def run(code, **env):
    e = {k: v for k, v in os.environ.items() if k != "FUSEDLOSS_BACKEND"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=300)


def test_falls_back_without_cpp_extension():
    out = run(SCRIPT, FUSEDLOSS_JIT="0")  # not compiling it on first use either
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_bad_backend_name():
    out = run("import fusedloss", FUSEDLOSS_BACKEND="cuda-please")
    assert out.returncode != 0
    assert "FUSEDLOSS_BACKEND must be one of" in out.stderr


def _spy(monkeypatch, *names):
    """Count the calls of fusedloss.reference functions (the reference backend's ops)."""
    calls = collections.Counter()
    for name in names:
        def wrapped(*args, _fn=getattr(reference, name), _name=name):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(reference, name, wrapped)
    return calls


def test_use_backend_for_a_block_and_its_backward(monkeypatch):
    calls = _spy(monkeypatch, "cross_entropy_fwd", "cross_entropy_bwd", "bce_fwd", "bce_bwd")
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    y = torch.rand(6, 5, dtype=torch.float64)
    ce = fusedloss.functional.cross_entropy
    bce = fusedloss.functional.binary_cross_entropy_with_logits
    (ce(x, t) + bce(x, y)).backward()
    assert sum(calls.values()) == 0  # by device: the C++ kernels
    g_cpp = x.grad.clone()
    x.grad = None
    with fusedloss.use_backend("reference"):
        assert fusedloss.backends()["cpu"] == "reference"
        loss = ce(x, t) + bce(x, y)
    assert calls == {"cross_entropy_fwd": 1, "bce_fwd": 1}
    loss.backward()  # outside the block: backward still runs where forward ran
    assert calls == {"cross_entropy_fwd": 1, "bce_fwd": 1, "cross_entropy_bwd": 1, "bce_bwd": 1}
    torch.testing.assert_close(x.grad, g_cpp)
    assert fusedloss.backends()["cpu"] == "cpp" and _backend._override is None


def test_use_backend_overrides_the_environment_and_nests(monkeypatch):
    monkeypatch.setattr(_backend, "_ENV", "reference")
    x = torch.randn(3, 4)
    report = fusedloss.backends()
    assert report["cpu"] == "reference" and "FUSEDLOSS_BACKEND=reference" in report.reasons["cpu"]
    with fusedloss.use_backend(None):  # by device, whatever FUSEDLOSS_BACKEND says
        assert _backend.backend_for(x) == "op"
        with fusedloss.use_backend("reference"):
            assert _backend.backend_for(x) == "reference"
            assert "use_backend('reference')" in fusedloss.backends().reasons["cpu"]
        assert _backend.backend_for(x) == "op"
    assert _backend.backend_for(x) == "reference"
    with pytest.raises(KeyError):
        with fusedloss.use_backend("cpp"):
            raise KeyError("left by an exception")
    assert _backend._override is None and _backend.backend_for(x) == "reference"


def test_use_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="name must be one of"):
        with fusedloss.use_backend("cuda"):
            pass
    monkeypatch.setattr(_backend, "HAS_CPP", False)
    with pytest.raises(RuntimeError, match="C\\+\\+ extension is not available"):
        with fusedloss.use_backend("cpp"):
            pass
    monkeypatch.setattr(_backend, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        with fusedloss.use_backend("triton"):
            pass
    assert _backend._override is None


def test_backends_report(monkeypatch):
    report = fusedloss.backends()
    assert set(report) == {"cpu", "cuda"}
    assert report["cpu"] == "cpp" and "C++ kernels" in report.reasons["cpu"]
    assert report["cuda"] == ("triton" if _backend.HAS_TRITON else "reference")
    text = str(report)
    assert fusedloss.__version__ in text and torch.__version__ in text
    assert all(f"{d}:" in text and report.reasons[d] in text for d in report)
    monkeypatch.setattr(_backend, "HAS_TRITON", False)
    report = fusedloss.backends()
    assert report["cuda"] == "reference" and "triton is not installed" in report.reasons["cuda"]
    monkeypatch.setattr(_backend, "HAS_CPP", False)
    monkeypatch.setattr(_backend, "CPP_STATUS", "fusedloss._C is not built")
    report = fusedloss.backends()
    assert report["cpu"] == "reference" and "fusedloss._C is not built" in report.reasons["cpu"]


def test_use_backend_under_torch_compile(monkeypatch):
    """torch.compile guards on the setting: a compiled function follows the block it is called in."""
    calls = _spy(monkeypatch, "cross_entropy_fwd")
    f = torch.compile(lambda x, t: fusedloss.functional.cross_entropy(x, t), fullgraph=True,
                      backend="eager")
    x, t = torch.randn(8, 5), torch.randint(0, 5, (8,))
    expected = torch.nn.functional.cross_entropy(x, t)
    torch.testing.assert_close(f(x, t), expected)
    assert sum(calls.values()) == 0
    with fusedloss.use_backend("reference"):
        torch.testing.assert_close(f(x, t), expected)
    assert calls["cross_entropy_fwd"] == 1
    torch.testing.assert_close(f(x, t), expected)
    assert calls["cross_entropy_fwd"] == 1
