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


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend; FUSEDLOSS_BACKEND is overridden for its duration."""
    be = request.param
    monkeypatch.setattr(_backend, "_ENV", be.env or "")
    return be
