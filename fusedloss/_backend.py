"""Which implementation runs a loss: the registered op, the Triton launcher, or the reference.

- "op": torch.ops.fusedloss.* — the C++ kernel for CPU tensors, the Triton kernel (registered for
  "cuda" from Python) for CUDA tensors. This is what torch.compile traces.
- "triton": call the Triton launcher directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
- "reference": plain PyTorch (fusedloss.reference), the fallback when the C++ extension is missing.

FUSEDLOSS_BACKEND=triton|cpp|reference forces one; it is read once, at import.
"""
import os
import warnings

import torch

_ENV = os.environ.get("FUSEDLOSS_BACKEND", "").strip().lower()
if _ENV not in ("", "auto", "triton", "cpp", "reference"):
    raise ValueError(f"FUSEDLOSS_BACKEND must be one of triton, cpp, reference; got {_ENV!r}")

try:
    from fusedloss import _C  # noqa: F401  (loading it registers the ops and CPU kernels)

    HAS_CPP = True
except ImportError as exc:  # not built: still importable, on the reference implementation
    HAS_CPP = False
    warnings.warn(
        "fusedloss: the C++ extension fusedloss._C is not built "
        f"({exc}); CPU losses fall back to the slower reference implementation. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

if _ENV == "cpp" and not HAS_CPP:
    raise ImportError("FUSEDLOSS_BACKEND=cpp, but the C++ extension fusedloss._C is not built")
if _ENV == "triton" and not HAS_TRITON:
    raise ImportError("FUSEDLOSS_BACKEND=triton, but triton is not installed")


def backend_for(t: torch.Tensor) -> str:
    """'op', 'triton' or 'reference' for a tensor on t's device. Meta and fake tensors take the
    registered op (its fake kernel) whatever FUSEDLOSS_BACKEND says, as torch's losses do."""
    if HAS_CPP and not has_values(t):
        return "op"
    if _ENV == "triton":
        return "triton"
    if _ENV == "reference":
        return "reference"
    if t.device.type == "cuda":
        if HAS_CPP and HAS_TRITON:
            return "op"
        return "triton" if HAS_TRITON else "reference"
    return "op" if HAS_CPP and t.device.type == "cpu" else "reference"


def impl(backend: str, triton_module, name: str):
    """The callable for op `name` on a backend: torch.ops.fusedloss.<name>, the Triton launcher
    triton_module.<name>, or fusedloss.reference.<name>; all three share names and signatures."""
    if backend == "op":
        return getattr(torch.ops.fusedloss, name)
    if backend == "triton":
        return getattr(triton_module, name)
    from . import reference

    return getattr(reference, name)


def register_triton(op_name: str, launcher) -> None:
    """Register a Triton launcher as the CUDA kernel of a C++-declared op."""
    if HAS_CPP and HAS_TRITON:
        torch.library.register_kernel(f"fusedloss::{op_name}", "cuda", launcher)


def has_values(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (FakeTensorMode outside torch.compile): shapes only, no
    values to read or check."""
    if type(t) is torch.Tensor:  # the common case, without the import below (per-call cost)
        return t.device.type != "meta"
    if t.device.type == "meta":
        return False
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def eager_checks_enabled(t: torch.Tensor) -> bool:
    """Value checks that read device data (a host sync on CUDA) run in eager mode only.

    Under torch.compile or CUDA-graph capture they are skipped; the kernels then treat bad values
    safely (never an out-of-bounds access) but cannot raise.
    """
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True
