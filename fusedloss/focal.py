"""Focal losses: sigmoid (torchvision.ops.sigmoid_focal_loss) and softmax (class-index targets).

One fused kernel pass (csrc/focal.cpp on the CPU, kernels/focal.py on CUDA) yields the loss and,
when a gradient is needed, the gradient already scaled for the reduction; backward only multiplies
by grad_output. Loss and gradient are finite for every gamma >= 0 and every finite logit: the
sigmoid terms are built from exp(-|x|), 1 - p_t is computed directly, and (1 - p_t)^(gamma - 1) is
never formed (derivations in csrc/focal.cpp).
"""
import numbers

import torch

from . import _backend
from ._common import (REDUCTION_CODE, REDUCTIONS, FusedLossTypeError, FusedLossValueError,
                      amp_dtype, call_or_none, check_class_targets_for, check_index_target,
                      check_same_device, check_tensor, class_count, class_weight_sum, out_dtype,
                      reduce_loss, resolve_reduction)
from .cross_entropy import _rows3d
from .reference import acc_dtype

if _backend.HAS_TRITON:
    from fusedloss.kernels import focal as _tk
else:
    _tk = None

_CHUNK = 4096  # elements per partial sum of the reduced sigmoid loss (kChunk in csrc/focal.cpp)

if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::sigmoid_focal_fwd")
    def _sigmoid_fake(input, target, grad_scale, alpha, gamma, reduce, compute_grad):
        acc = acc_dtype(input.dtype)
        if reduce:
            loss = input.new_empty((input.numel() + _CHUNK - 1) // _CHUNK, dtype=acc)
        else:
            loss = input.new_empty(input.shape, dtype=acc)
        return loss, input.new_empty(input.shape) if compute_grad else input.new_empty(0)

    @torch.library.register_fake("fusedloss::softmax_focal")
    def _whole_fake(input, target, alpha, gamma, ignore_index, reduction, out_dtype):
        return input.new_empty(target.shape if reduction == 0 else (), dtype=out_dtype)

    @torch.library.register_fake("fusedloss::softmax_focal_fwd")
    def _softmax_fake(logits, target, alpha, grad_scale, ignore_index, gamma, compute_grad):
        rows = logits.shape[0] * logits.shape[2]
        grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
        return logits.new_empty(rows, dtype=acc_dtype(logits.dtype)), grad

    if _tk is not None:
        _backend.register_triton("sigmoid_focal_fwd", _tk.sigmoid_focal_fwd)
        _backend.register_triton("softmax_focal_fwd", _tk.softmax_focal_fwd)


def _impl(name, t):
    return _backend.impl(_backend.backend_for(t), _tk, name)


def _check_gamma(gamma):
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not gamma >= 0:
        raise FusedLossValueError(f"gamma must be a real number >= 0, got {gamma!r}")
    if gamma == float("inf"):
        raise FusedLossValueError("gamma must be finite")
    return float(gamma)


class _SigmoidFocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, targets, alpha, gamma, reduction, normalizer):
        x = inputs.contiguous()
        y = targets.to(inputs.dtype).contiguous()
        acc = acc_dtype(inputs.dtype)
        compute_grad = ctx.needs_input_grad[0]
        denom = None
        if normalizer is not None:
            # Guard zero (e.g. no positive anchors) on the device: no host sync.
            n = normalizer.to(device=x.device, dtype=acc).reshape(())
            denom = torch.where(n == 0, torch.ones_like(n), n)
        elif reduction == "mean":
            denom = torch.full((), x.numel(), dtype=acc, device=x.device)
        scale = None if denom is None else denom.reciprocal()
        loss, grad = _impl("sigmoid_focal_fwd", x)(x, y, scale, alpha, gamma, reduction != "none",
                                                   compute_grad)
        out = loss.sum() if reduction != "none" else loss
        out = out if denom is None else out / denom
        ctx.set_materialize_grads(False)
        if compute_grad:
            ctx.save_for_backward(grad)
        return out.to(amp_dtype(inputs))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 6
        (grad,) = ctx.saved_tensors
        # grad_out is a scalar, or the input's shape for 'none'. Out of place, so that
        # retain_graph / gradcheck can backpropagate again.
        return grad * grad_out, None, None, None, None, None


def sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none", *, normalizer=None):
    """torchvision.ops.sigmoid_focal_loss, fused and finite for every gamma >= 0 and logit.

    inputs: logits of any shape; targets: same shape, in [0, 1] (soft targets allowed; converted
    to the inputs' dtype). alpha in [0, 1] weights positives (1 - alpha the negatives); alpha = -1
    disables the weighting; other values raise ValueError, as torchvision 0.29 does.
    reduction: 'none' | 'mean' (over all elements) | 'sum' (else ValueError, torchvision's text).
    normalizer (keyword-only): a number or a one-element tensor (e.g. the number of positive
    anchors, kept on the device) that divides the loss: with 'sum' or 'mean' the result is
    sum / normalizer (it replaces the element count of 'mean'); with 'none' each element is
    divided. A normalizer equal to 0 counts as 1, decided on the device (no host sync).
    The gradient is taken with respect to inputs only; targets must not require grad.
    """
    if reduction not in REDUCTIONS:  # torchvision's message (its tests match "Invalid")
        raise FusedLossValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported "
                                  f"reduction modes: 'none', 'mean', 'sum'")
    check_tensor("inputs", inputs)
    check_tensor("targets", targets, floating=False)
    if targets.shape != inputs.shape:
        raise FusedLossValueError(f"targets must have the inputs' shape {tuple(inputs.shape)}, "
                                  f"got {tuple(targets.shape)}")
    if targets.is_complex():
        raise FusedLossTypeError(f"targets must be real, got {targets.dtype}")
    if targets.requires_grad:
        raise FusedLossValueError(
            "targets must not require grad: the fused kernel differentiates inputs "
            "only (pass targets.detach())")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise FusedLossTypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not 0 <= alpha <= 1 and alpha != -1:  # torchvision's rule and message (0.29)
        raise FusedLossValueError(f"Invalid alpha value: {alpha}. alpha must be in the range [0,1] "
                                  f"or -1 for ignore.")
    gamma = _check_gamma(gamma)
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise FusedLossValueError(
                    f"normalizer must be a number or a one-element tensor, got shape "
                    f"{tuple(normalizer.shape)}")
            if normalizer.is_complex():
                raise FusedLossTypeError(f"normalizer must be real, got {normalizer.dtype}")
            check_same_device("inputs", inputs, normalizer=normalizer)
        elif isinstance(normalizer, numbers.Real) and not isinstance(normalizer, bool):
            if not normalizer >= 0:
                raise FusedLossValueError(f"normalizer must be >= 0, got {normalizer!r}")
            normalizer = torch.tensor(float(normalizer), device=inputs.device)
        else:
            raise FusedLossTypeError(f"normalizer must be a number or a tensor, "
                                     f"got {type(normalizer).__name__}")
    check_same_device("inputs", inputs, targets=targets)
    return _SigmoidFocal.apply(inputs, targets, float(alpha), gamma, reduction, normalizer)


_SFN = "fusedloss.softmax_focal_loss"
# fusedloss::softmax_focal (one call: kernel, reduction and autograd in C++, csrc/autograd.cpp) and
# its Autograd kernel called without the dispatcher in plain eager calls (csrc/python.cpp).
_whole_op = torch.ops.fusedloss.softmax_focal.default if _backend.HAS_CPP else None
_direct = getattr(_backend.C_MODULE, "softmax_focal", None)


class _SoftmaxFocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, alpha, gamma, ignore_index, reduction):
        x3 = _rows3d(input)
        n_classes = x3.shape[1]
        t = target.reshape(-1).long()
        acc = acc_dtype(input.dtype)
        a = None if alpha is None else alpha.to(acc).contiguous()
        compute_grad = ctx.needs_input_grad[0]
        check_class_targets_for(_SFN, _backend.backend_for(x3), x3, t, n_classes, ignore_index)
        denom = scale = None
        if reduction == "mean":
            denom = class_weight_sum(t, a, ignore_index, n_classes, acc)
            scale = denom.reciprocal()
        loss, grad = _impl("softmax_focal_fwd", x3)(x3, t, a, scale, ignore_index, gamma,
                                                    compute_grad)
        out = reduce_loss(loss, reduction, denom)
        out = out.view(target.shape) if reduction == "none" else out
        ctx.reduction = reduction
        ctx.set_materialize_grads(False)
        if compute_grad:
            ctx.save_for_backward(grad.view(input.shape))
        return out.to(amp_dtype(input))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 6
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":  # one factor per row: broadcast over the class dim
            g3 = _rows3d(grad)
            grad = (g3 * grad_out.reshape(g3.shape[0], 1, g3.shape[2])).view(grad.shape)
        else:
            grad = grad * grad_out
        return grad, None, None, None, None, None


def softmax_focal_loss(input, target, gamma: float = 2.0, alpha=None, ignore_index: int = -100,
                       reduction: str = "mean"):
    """Softmax focal loss over class-index targets: -alpha_t (1 - p_t)^gamma log p_t per row.

    input: (C,), (N, C) or (N, C, d1, ..., dk) logits; target: int64 (or uint8) class indices of
    shape (), (N) or (N, d1, ..., dk). alpha: None, a number, or a per-class tensor (C,).
    'mean' divides by the sum of alpha_t over non-ignored rows (the count without alpha), so with
    gamma = 0 this equals cross_entropy(input, target, weight=alpha, ignore_index=...).
    Target range: as cross_entropy (IndexError on CPU tensors, a device-side assert on CUDA).
    """
    if _direct is not None and not torch.compiler.is_compiling() and _backend.cpu_op():
        out = _direct(input, target, alpha, gamma, ignore_index, reduction)
        if out is not None:
            return out
    if (type(input) is torch.Tensor and type(target) is torch.Tensor and input.is_cpu
            and target.dtype is torch.int64 and type(gamma) in (float, int)
            and (alpha is None or type(alpha) is torch.Tensor) and type(reduction) is str
            and _backend.cpu_op()):
        # The common case as one call of the C++ op (see call_or_none): under autocast, a mode
        # or torch.compile, which the direct call leaves to the dispatcher.
        code = REDUCTION_CODE.get(reduction)
        if code is not None:
            out = call_or_none(_whole_op, input, target, alpha, float(gamma), int(ignore_index),
                               code, out_dtype(input))
            if out is not None:
                return out
    reduction = resolve_reduction(reduction)
    n_classes = class_count(input)
    check_tensor("target", target, floating=False)
    check_index_target(input, target)
    gamma = _check_gamma(gamma)
    if alpha is not None:
        if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            alpha = torch.full((n_classes,), float(alpha), dtype=acc_dtype(input.dtype),
                               device=input.device)
        elif isinstance(alpha, torch.Tensor):
            check_tensor("alpha", alpha)
            if alpha.dim() != 1 or alpha.numel() != n_classes:
                raise FusedLossValueError(
                    f"alpha must be a number or have shape ({n_classes},) (one per "
                    f"class), got {tuple(alpha.shape)}")
        else:
            raise FusedLossTypeError(
                f"alpha must be None, a number or a tensor, got {type(alpha).__name__}")
    check_same_device("input", input, target=target, alpha=alpha)
    return _SoftmaxFocal.apply(input, target, alpha, gamma, int(ignore_index), reduction)
