"""Argument checks and the reduction step shared by every loss."""
import torch

from . import _backend

REDUCTIONS = ("none", "mean", "sum")
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}  # the ops' int reduction argument
# ... and for the one-call KL divergence and distillation ops, which also take 'batchmean'
OP_REDUCTION_CODE = {**REDUCTION_CODE, "batchmean": 3}


class FusedLossValueError(ValueError, RuntimeError):
    """A bad argument value or shape. A ValueError (Python's convention) and a RuntimeError (what
    torch's own C++ checks raise), so code written for either catches it."""


class FusedLossTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype: a TypeError and, as torch raises, a RuntimeError."""


def resolve_reduction(reduction: str, size_average=None, reduce=None) -> str:
    """The reduction string, honouring PyTorch's legacy size_average / reduce arguments."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = ("mean" if size_average else "sum") if reduce else "none"
    if reduction not in REDUCTIONS:
        raise FusedLossValueError(
            f"reduction must be one of 'none', 'mean', 'sum'; got {reduction!r}")
    return reduction


def check_tensor(name: str, t, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise FusedLossTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise FusedLossTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise FusedLossValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def class_count(input) -> int:
    """C of a floating input of shape (C,), (N, C) or (N, C, d1, ..., dk)."""
    check_tensor("input", input)
    if input.dim() == 0:
        raise FusedLossValueError(
            "input must have shape (C,), (N, C) or (N, C, d1, ..., dk); got a scalar")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if n_classes < 1:
        raise FusedLossValueError(
            f"input must have at least one class, got shape {tuple(input.shape)}")
    return n_classes


def check_index_target(input: torch.Tensor, target: torch.Tensor, alternative: str = "") -> None:
    """Class-index target: int64 (or uint8, as torch) of shape (N, d1, ..., dk), () for (C,)."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise FusedLossTypeError(f"target must hold int64 (or uint8) class indices{alternative}, "
                                 f"got {target.dtype}")
    shape, tshape = input.shape, target.shape
    # (compared piecewise: building the expected torch.Size costs more than a small loss)
    if len(shape) == 1:
        ok = len(tshape) == 0
    else:
        ok = len(tshape) == len(shape) - 1 and tshape[0] == shape[0] and tshape[1:] == shape[2:]
    if not ok:
        expected = shape[:1] + shape[2:] if len(shape) > 1 else torch.Size([])
        raise FusedLossValueError(f"target must have shape {tuple(expected)} for input of shape "
                                  f"{tuple(input.shape)}, got {tuple(target.shape)}")


def check_class_targets(fn: str, target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise IndexError for a class index outside [0, C) that is not ignore_index.

    Reads the target on the host: the callers only run it where that is free or allowed
    (see _backend.eager_checks_enabled).
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"{fn}: target {value} is out of bounds for {n_classes} classes")


def amp_dtype(t: torch.Tensor) -> torch.dtype:
    """t's dtype as torch's losses see it under torch.autocast for t's device: fp16 and bf16 count
    as fp32. Every loss here is on autocast's fp32 list (binary_cross_entropy_with_logits,
    huber_loss, smooth_l1_loss; cross_entropy through log_softmax and nll_loss; torchvision's
    sigmoid focal loss through BCE and pow), so torch casts a half-precision input to fp32 and
    returns fp32. fusedloss reads the half-precision input in place, computes in fp32 as always,
    and returns the loss in this dtype; the gradient keeps the input's dtype. fp64 is not cast."""
    if (t.dtype in (torch.float16, torch.bfloat16) and t.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(t.device.type)):
        return torch.float32
    return t.dtype


def out_dtype(t: torch.Tensor) -> torch.dtype:
    """amp_dtype(t), without the autocast query for fp32 and fp64 (a small loss's per-call cost)."""
    dt = t.dtype
    return dt if dt is torch.float32 or dt is torch.float64 else amp_dtype(t)


def call_or_none(op, *args):
    """op(*args), or None where the op rejects its arguments (a RuntimeError from its C++ checks).

    The functionals' fast path: the common case as one call of a C++ op that checks its own
    arguments (a small batch's time is per-call overhead). On None the caller runs its Python
    checks, which raise the error that names the bad argument (an IndexError for a bad class
    index is not caught: it is the call's own error)."""
    try:
        return op(*args)
    except RuntimeError:
        return None


def reduce_loss(loss: torch.Tensor, reduction: str, denom=None) -> torch.Tensor:
    """Reduce a per-element loss (kept in the accumulation dtype): sum, or sum / denom for mean
    (denom a device tensor, default numel); 'none' returns it as is."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (loss.numel() if denom is None else denom)


def check_class_targets_for(fn: str, backend: str, x: torch.Tensor, target: torch.Tensor,
                            n_classes: int, ignore_index: int) -> None:
    """The class-index range check for a call on `backend`:

    - CPU tensors on the C++ op: nothing here, the kernel checks while it reads (free) and raises
      IndexError.
    - CUDA tensors: a device-side assertion (torch._assert_async, as torch's own CUDA losses
      assert on the device), queued on the stream: no host sync, and it stays in the graph under
      torch.compile and CUDA-graph capture. A bad target makes a later synchronising call raise
      RuntimeError "CUDA error: device-side assert triggered" (the CUDA context is then lost).
    - Otherwise (the Triton interpreter or the reference on CPU tensors): a host check raising
      IndexError, in eager mode only.
    """
    if not _backend.has_values(target):
        return
    if x.device.type == "cuda":
        ok = (target == ignore_index) | ((target >= 0) & (target < n_classes))
        torch._assert_async(ok.all(), f"{fn}: a target is outside [0, {n_classes}) and is not "
                                      f"ignore_index")
    elif backend != "op" and _backend.eager_checks_enabled(target):
        check_class_targets(fn, target, n_classes, ignore_index)


def class_weight_sum(target: torch.Tensor, weight, ignore_index: int, n_classes: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The mean's denominator over class-index rows: sum of weight[target] (the count without
    weights) over non-ignored rows, as a device tensor: no host sync."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum(dtype=dtype)
    return torch.where(valid, weight[target.clamp(0, n_classes - 1)], 0.0).sum()
