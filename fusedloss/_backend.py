"""Which implementation runs a loss: the registered op, the Triton launcher, or the reference.

- "op": torch.ops.fusedloss.* — the C++ kernel for CPU tensors, the Triton kernel (registered for
  "cuda" from Python) for CUDA tensors. This is what torch.compile traces.
- "triton": call the Triton launcher directly (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
- "reference": plain PyTorch (fusedloss.reference), the fallback when the C++ extension is missing.

FUSEDLOSS_BACKEND=triton|cpp|reference forces one for the process (read once, at import);
use_backend() forces one for a block of code. backends() says what runs where, and why.
"""
import contextlib
import importlib
import os
import warnings

import torch

from . import _extension

_NAMES = ("triton", "cpp", "reference")
_ENV = os.environ.get("FUSEDLOSS_BACKEND", "").strip().lower()
if _ENV not in ("", "auto", *_NAMES):
    raise ValueError(f"FUSEDLOSS_BACKEND must be one of triton, cpp, reference; got {_ENV!r}")

# Set by use_backend(): None (no override), "" (by device) or one of _NAMES.
_override = None

# Loads fusedloss._C, built at install time or else compiled on first import (see _extension).
HAS_CPP, CPP_STATUS = _extension.load(os.path.dirname(os.path.abspath(__file__)))
# The extension as a Python module (its direct entry points, csrc/python.cpp), None without it.
C_MODULE = importlib.import_module("fusedloss._C") if HAS_CPP else None
if not HAS_CPP:  # still importable, on the reference implementation
    warnings.warn(
        f"fusedloss: CPU losses fall back to the slower reference implementation: {CPP_STATUS}. "
        "Build the C++ extension with `pip install --no-build-isolation .` (in a clone: "
        "`bash .ci/setup`).",
        RuntimeWarning,
        stacklevel=2,
    )

try:
    import triton

    HAS_TRITON, TRITON_VERSION = True, triton.__version__
except ImportError:
    HAS_TRITON, TRITON_VERSION = False, None

if _ENV == "cpp" and not HAS_CPP:
    raise ImportError(f"FUSEDLOSS_BACKEND=cpp, but the C++ extension is not available: "
                      f"{CPP_STATUS}")
if _ENV == "triton" and not HAS_TRITON:
    raise ImportError("FUSEDLOSS_BACKEND=triton, but triton is not installed")


def _forced() -> str:
    """The forced backend name ("" = by device): use_backend()'s, else FUSEDLOSS_BACKEND's."""
    forced = _ENV if _override is None else _override
    return "" if forced == "auto" else forced


def _choose(device_type: str) -> str:
    forced = _forced()
    if forced in ("triton", "reference"):
        return forced
    if device_type == "cuda":
        if HAS_CPP and HAS_TRITON:
            return "op"
        return "triton" if HAS_TRITON else "reference"
    return "op" if HAS_CPP and device_type == "cpu" else "reference"


def release_buffers() -> int:
    """Free the large CPU buffer fusedloss keeps for reuse (the last freed logits-sized gradient,
    kept so that the next step's gradient is written to memory already mapped: no page faults);
    returns its size in bytes. FUSEDLOSS_REUSE_BUFFERS=0 turns the reuse off."""
    return torch.ops.fusedloss.release_buffers() if HAS_CPP else 0


def cpu_op() -> bool:
    """True when a plain CPU tensor takes the C++ op (nothing forces another backend): the
    functionals' one-call fast path (see cross_entropy.cross_entropy)."""
    return HAS_CPP and _forced() in ("", "cpp")


def backend_for(t: torch.Tensor) -> str:
    """'op', 'triton' or 'reference' for a tensor on t's device. Meta and fake tensors take the
    registered op (its fake kernel) whatever backend is forced, as torch's losses do."""
    if HAS_CPP and not has_values(t):
        return "op"
    return _choose(t.device.type)


@contextlib.contextmanager
def use_backend(name):
    """Run the losses called inside the block on one backend: "cpp", "triton" or "reference", or
    None to choose by device (ignoring FUSEDLOSS_BACKEND). It overrides FUSEDLOSS_BACKEND, nests,
    and is undone on leaving the block, exception or not. For comparing backends in one process:

        with fusedloss.use_backend("reference"):
            expected = loss_fn(logits, target)

    "cpp" is the choice by device with the C++ extension required (CPU tensors run the C++
    kernels, CUDA tensors the Triton kernels behind the same ops); "triton" on CPU tensors needs
    TRITON_INTERPRET=1 set before fusedloss is imported. A loss's backward runs on the backend its
    forward ran on, even outside the block.

    The setting is process-wide (a module-level variable), not per thread: autograd runs CUDA
    backward passes on threads of its own, and torch.compile guards on module-level state, so a
    compiled function recompiles for each setting it is called under. Do not switch backends from
    several threads at once.
    """
    global _override
    if name is not None and name not in _NAMES:
        raise ValueError(f"use_backend: name must be one of 'cpp', 'triton', 'reference' or None, "
                         f"got {name!r}")
    if name == "cpp" and not HAS_CPP:
        raise RuntimeError(f"use_backend('cpp'): the C++ extension is not available: {CPP_STATUS}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("use_backend('triton'): triton is not installed")
    previous, _override = _override, "" if name is None else name
    try:
        yield
    finally:
        _override = previous


class Backends(dict):
    """Device type ("cpu", "cuda") -> the backend its losses run on ("cpp", "triton" or
    "reference"); .reasons holds why, and str() prints both."""

    def __init__(self, choices, reasons):
        super().__init__(choices)
        self.reasons = reasons

    def __str__(self):
        head = f"fusedloss {_version()} on torch {torch.__version__}"
        rows = [f"  {d + ':':5} {b:10} {self.reasons[d]}" for d, b in self.items()]
        return "\n".join([head] + rows)


def _version():
    from . import __version__

    return __version__


def backends() -> Backends:
    """Which implementation the losses run on for CPU and for CUDA tensors now, and why: the C++
    extension (built at install time, compiled on first use, or missing and why), triton
    (importable or not), and any override (use_backend(), FUSEDLOSS_BACKEND)."""
    forced = _forced()
    by = (f"use_backend({_override or None!r})" if _override is not None
          else f"FUSEDLOSS_BACKEND={_ENV}")
    triton_txt = f"triton {TRITON_VERSION}" if HAS_TRITON else "triton is not installed"
    no_gpu = "" if torch.cuda.is_available() else "; no CUDA device visible now"
    choices, reasons = {}, {}
    for device in ("cpu", "cuda"):
        be = _choose(device)
        if forced in ("triton", "reference"):
            why = f"forced by {by}"
            if be == "triton" and device == "cpu":
                why += " (CPU tensors run Triton only under TRITON_INTERPRET=1)"
        elif device == "cpu":
            why = ("C++ kernels: " if be == "op" else "plain PyTorch: ") + CPP_STATUS
        elif be == "op":
            why = f"Triton kernels ({triton_txt}) behind torch.ops.fusedloss{no_gpu}"
        elif be == "triton":
            why = (f"Triton kernels ({triton_txt}), called directly: the ops are not registered "
                   f"without the C++ extension{no_gpu}")
        else:
            why = f"plain PyTorch: {triton_txt} (the CUDA kernels need it){no_gpu}"
        if forced == "cpp":
            why += f" (cpp required by {by})"
        choices[device] = {"op": "cpp" if device == "cpu" else "triton"}.get(be, be)
        reasons[device] = why
    return Backends(choices, reasons)


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
