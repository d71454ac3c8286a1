"""Softmax cross-entropy: a drop-in for torch.nn.functional.cross_entropy.

Class-index targets run fused kernels (csrc/cross_entropy.cpp on the CPU, kernels/cross_entropy.py
on CUDA): forward reads each row once and keeps only the per-row lse; backward reads it once more and
writes the gradient with grad_output and the mean's 1/sum of weights folded in.
Probability targets take a plain-PyTorch path (fp32 math).

inplace_backward=True on the Triton kernels (CUDA) with reduction 'mean' or 'sum' and contiguous
logits takes the one-read scheme instead (_one_read): forward writes the gradient over the logits in
the pass that reads them, so `input` holds its gradient as soon as the loss returns, not only after
backward.
"""
import torch

from . import _backend
from ._common import (REDUCTION_CODE, FusedLossValueError, amp_dtype, check_class_targets_for,
                      check_index_target, check_same_device, check_tensor, class_count,
                      class_weight_sum, call_or_none, out_dtype, reduce_loss,
                      resolve_reduction)
from .reference import acc_dtype

_FN = "fusedloss.cross_entropy"

if _backend.HAS_TRITON:
    from fusedloss.kernels import cross_entropy as _tk
else:
    _tk = None

if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::cross_entropy_fwd")
    def _fwd_fake(logits, target, weight, ignore_index, label_smoothing, z_loss):
        rows = logits.shape[0] * logits.shape[2]
        acc = acc_dtype(logits.dtype)
        return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)

    @torch.library.register_fake("fusedloss::cross_entropy_bwd")
    def _bwd_fake(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing, z_loss):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("fusedloss::cross_entropy_bwd_inplace")
    def _bwd_inplace_fake(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing,
                          z_loss):
        return None

    @torch.library.register_fake("fusedloss::cross_entropy")
    def _whole_fake(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                    out_dtype):
        return input.new_empty(target.shape if reduction == 0 else (), dtype=out_dtype)

    _whole_op = torch.ops.fusedloss.cross_entropy.default

    if _tk is not None:
        for _name in ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_inplace"):
            _backend.register_triton(_name, getattr(_tk, _name))

# Its Autograd kernel called without the dispatcher, in plain eager calls (csrc/python.cpp).
_direct = getattr(_backend.C_MODULE, "cross_entropy", None)


def _rows3d(input: torch.Tensor) -> torch.Tensor:
    """View input as [N, C, D]: (C,) -> (1, C, 1), (N, C) -> (N, C, 1), (N, C, d1..dk) -> (N, C, D).

    Keeps the input's strides (no copy) except where the spatial dims cannot be merged.
    """
    if input.dim() == 1:
        return input.view(1, -1, 1) if input.is_contiguous() else input.unsqueeze(0).unsqueeze(-1)
    if input.dim() == 2:
        return input.unsqueeze(-1)
    return input.flatten(2)


def _ce_forward(x3, t, w, ignore_index, label_smoothing, z_loss, check_targets=True):
    """Per-row (loss, lse) in the acc dtype from the backend for x3's device.

    x3: logits [N, C, D] (see _rows3d); t: contiguous int64 targets [N*D]; w: None or [C] weights
    in the acc dtype. Raises IndexError for a target outside [0, C) that is not ignore_index
    (check_targets=False: the caller guarantees the range, skipping the host read on CUDA).
    """
    be = _backend.backend_for(x3)
    if check_targets:
        check_class_targets_for(_FN, be, x3, t, x3.shape[1], ignore_index)
    return _backend.impl(be, _tk, "cross_entropy_fwd")(x3, t, w, ignore_index, label_smoothing, z_loss)


def _one_read(backend: str, x3: torch.Tensor, reduction: str) -> bool:
    """Whether inplace_backward takes the one-read scheme: forward writes the gradient (for
    grad_output = 1, the mean's 1/sum of weights folded in) over the logits as it reads them,
    backward only scales it, on the device and only when grad_output is not 1 (kernels/
    cross_entropy.py scale_inplace). Per fwd+bwd that is one read and one write of the logits
    where recomputing reads them twice: on a GPU, with no page faults to avoid, the cheaper.

    Only on the Triton kernels (CUDA tensors, or CPU tensors under the interpreter, so that the
    tests run it; the C++ CPU kernels keep the recompute scheme, measured faster there), for
    'mean' and 'sum' (with 'none' grad_output is one factor per row, unknown at forward: scaling
    afterwards would cost a pass more than recomputing) and contiguous logits (scale_inplace
    runs over one flat run)."""
    if _tk is None or reduction == "none" or not x3.is_contiguous():
        return False
    return backend == "triton" or (backend == "op" and x3.device.type == "cuda")


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, label_smoothing, z_loss, reduction,
                inplace):
        x3 = _rows3d(input)
        t = target.reshape(-1).long().contiguous()
        acc = acc_dtype(input.dtype)
        w = None if weight is None else weight.to(acc).contiguous()
        be = _backend.backend_for(x3)
        # The gradient goes over the logits only where x3 really is the input's memory, and not
        # under torch.compile (which plans its own buffers).
        ctx.inplace = (inplace and ctx.needs_input_grad[0] and not torch.compiler.is_compiling()
                       and x3.data_ptr() == input.data_ptr())
        ctx.one_read = ctx.inplace and _one_read(be, x3, reduction)
        denom = None
        if reduction == "mean":
            denom = class_weight_sum(t, w, ignore_index, x3.shape[1], acc)
        if ctx.one_read:
            # Eager only (ctx.inplace excludes torch.compile), so the Triton launcher is called
            # directly, also where the op backend would dispatch to it.
            check_class_targets_for(_FN, be, x3, t, x3.shape[1], ignore_index)
            scale = None if denom is None else denom.reciprocal()
            loss, lse = _tk.cross_entropy_fwd(x3, t, w, ignore_index, label_smoothing, z_loss,
                                              grad_scale=scale, grad=x3)
            # From here the logits hold their gradient: whatever saved them for its backward
            # raises instead of reading a gradient as logits.
            torch.autograd.graph.increment_version(input)
        else:
            loss, lse = _ce_forward(x3, t, w, ignore_index, label_smoothing, z_loss)
        out = reduce_loss(loss, reduction, denom)
        out = out.view(target.shape) if reduction == "none" else out
        ctx.reduction, ctx.options = reduction, (ignore_index, label_smoothing, z_loss)
        ctx.backend = be  # backward runs where forward ran (use_backend)
        ctx.save_for_backward(input, t, w, lse, denom)
        return out.to(amp_dtype(input))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, t, w, lse, denom = ctx.saved_tensors
        x3 = _rows3d(input)
        if ctx.one_read:
            # The gradient is already there for grad_output = 1; scale_inplace multiplies by
            # grad_output unless it is 1, decided on the device. The version bump makes a
            # second backward (retain_graph) raise instead of scaling a gradient twice.
            _tk.scale_inplace(x3, grad_out.reshape(1).to(lse.dtype))
            torch.autograd.graph.increment_version(input)
            return input, None, None, None, None, None, None, None
        # grad_output (one per row for 'none'), times 1/sum of weights for mean, in the acc dtype.
        scale = grad_out.reshape(-1).to(lse.dtype)
        if denom is not None:
            scale = scale / denom
        scale = scale.contiguous()
        be = ctx.backend
        if ctx.inplace:
            # The lean path: the logits' memory receives their gradient. The saved input's
            # version changes, so a second backward, or any other backward that saved the
            # logits and runs later, raises instead of reading a gradient as logits.
            _backend.impl(be, _tk, "cross_entropy_bwd_inplace")(scale, x3, t, lse, w, *ctx.options)
            torch.autograd.graph.increment_version(input)  # custom ops do not bump it themselves
            return input, None, None, None, None, None, None, None
        grad = _backend.impl(be, _tk, "cross_entropy_bwd")(scale, x3, t, lse, w, *ctx.options)
        return grad.view(input.shape), None, None, None, None, None, None, None


def _cross_entropy_probs(input, target, weight, reduction, label_smoothing, z_loss):
    """Probability targets: plain PyTorch in the acc dtype (mean divides by the row count)."""
    acc = acc_dtype(input.dtype)
    dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[dim]
    logp = torch.log_softmax(input.to(acc), dim=dim)
    t = target.to(acc)
    if label_smoothing > 0:
        t = t * (1 - label_smoothing) + label_smoothing / n_classes
    if weight is not None:
        shape = [1] * input.dim()
        shape[dim] = n_classes
        t = t * weight.to(acc).view(shape)
    loss = -(t * logp).sum(dim)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(input.to(acc), dim=dim).square()
    return reduce_loss(loss, reduction).to(amp_dtype(input))


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, inplace_backward=False):
    """torch.nn.functional.cross_entropy, fused. Same arguments, shapes, dtypes and errors.

    Extras (keyword-only, off by default):
      z_loss: coefficient s of an auxiliary s * logsumexp(row)^2 per non-ignored row (PaLM's
        z-loss), reduced like the main term.
      inplace_backward: backward writes the gradient over `input` instead of a new logits-sized
        buffer (class-index targets; input must not be a leaf). After backward `input` holds its
        gradient; autograd raises if a later backward (another user of the logits, or a second
        backward through this loss) needs the overwritten values. Ignored under torch.compile
        and under no_grad. On the Triton kernels (CUDA) with reduction 'mean' or 'sum' the
        gradient is written during forward (one read of the logits instead of two): read what
        you need from `input` (accuracy, argmax) before calling the loss.
    Target range: an index outside [0, C) that is not ignore_index raises IndexError on CPU
    tensors; on CUDA it trips a device-side assertion (no host sync; see
    _common.check_class_targets_for).
    """
    if (_direct is not None and not torch.compiler.is_compiling() and not inplace_backward
            and size_average is None and reduce is None and _backend.cpu_op()):
        # Plain CPU tensors in eager mode: the op's autograd kernel called directly (a small
        # batch's time is per-call overhead); None where that does not apply.
        out = _direct(input, target, weight, reduction, ignore_index, label_smoothing, z_loss)
        if out is not None:
            return out
    if (type(input) is torch.Tensor and type(target) is torch.Tensor and input.is_cpu
            and target.dtype is torch.int64 and type(reduction) is str and size_average is None
            and reduce is None and not inplace_backward
            and (weight is None or type(weight) is torch.Tensor) and _backend.cpu_op()):
        # The common case as one call of the C++ op (see call_or_none): under autocast, a mode
        # or torch.compile, which the direct call leaves to the dispatcher.
        code = REDUCTION_CODE.get(reduction)
        if code is not None:
            out = call_or_none(_whole_op, input, target, weight, code, int(ignore_index),
                               float(label_smoothing), float(z_loss), out_dtype(input))
            if out is not None:
                return out
    reduction = resolve_reduction(reduction, size_average, reduce)
    n_classes = class_count(input)
    check_tensor("target", target, floating=False)
    if weight is not None:
        check_tensor("weight", weight)
        if weight.dim() != 1 or weight.numel() != n_classes:
            raise FusedLossValueError(f"weight must have shape ({n_classes},) (one per class), "
                                      f"got {tuple(weight.shape)}")
    check_same_device("input", input, target=target, weight=weight)
    if not 0.0 <= label_smoothing <= 1.0:
        raise FusedLossValueError(
            f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not z_loss >= 0.0:
        raise FusedLossValueError(f"z_loss must be >= 0, got {z_loss}")

    if target.is_floating_point():
        if target.shape != input.shape:
            raise FusedLossValueError(
                f"probability target must have the input's shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}")
        return _cross_entropy_probs(input, target, weight, reduction, label_smoothing, z_loss)
    check_index_target(input, target, " or floating-point probabilities")
    if inplace_backward and input.requires_grad and input.is_leaf:
        raise FusedLossValueError(
            "inplace_backward=True overwrites input with its gradient, which cannot "
            "be done to a leaf tensor that requires grad")
    backend = _backend.backend_for(input)
    if backend == "op" and not inplace_backward:
        # One op call: the kernels, the reduction and the autograd in C++ (csrc/autograd.cpp).
        check_class_targets_for(_FN, backend, input, target, n_classes, ignore_index)
        return _whole_op(input, target, weight, REDUCTION_CODE[reduction], int(ignore_index),
                         float(label_smoothing), float(z_loss), amp_dtype(input))
    # Under no_grad no backward will come: nothing may be written over the logits (the one-read
    # scheme writes in forward, where grad mode is always off).
    return _CrossEntropy.apply(input, target, weight, int(ignore_index), float(label_smoothing),
                               float(z_loss), reduction,
                               bool(inplace_backward) and torch.is_grad_enabled())
