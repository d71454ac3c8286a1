"""Backend selection: the package imports without the C++ extension and falls back, with one
warning, to the reference implementation; FUSEDLOSS_BACKEND is validated."""
import os
import subprocess
import sys

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
    out = run(SCRIPT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_bad_backend_name():
    out = run("import fusedloss", FUSEDLOSS_BACKEND="cuda-please")
    assert out.returncode != 0
    assert "FUSEDLOSS_BACKEND must be one of" in out.stderr
