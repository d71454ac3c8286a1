"""Huber and SmoothL1: drop-ins for torch.nn.functional.huber_loss / smooth_l1_loss.

Fused element-wise kernels (csrc/huber.cpp on the CPU, kernels/huber.py on CUDA) over input and
target broadcast as torch does: forward writes the loss, backward the gradients for input and
target; delta, beta, 1/numel and grad_output are applied in fp32. SmoothL1 with beta = 0 is exact L1 (sign(0) = 0, no NaN).
"""
import warnings

import torch

from . import _backend
from ._common import (FusedLossValueError, amp_dtype, check_same_device, check_tensor, reduce_loss,
                      resolve_reduction)
from . import _elementwise
from ._elementwise import IMPLS, ElementwiseLoss, broadcast_shape, fake_bwd, fake_fwd

if _backend.HAS_TRITON:
    from fusedloss.kernels import huber as _tk
else:
    _tk = None

if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::huber_fwd")
    def _huber_fwd_fake(input, target, weight, delta, smooth_l1, reduction):
        return fake_fwd(input, reduction)

    @torch.library.register_fake("fusedloss::huber_bwd")
    def _huber_bwd_fake(grad_out, input, target, weight, delta, smooth_l1, reduction, grad_input,
                        grad_target):
        return fake_bwd(input, grad_input, grad_target)

    if _tk is not None:
        _backend.register_triton("huber_fwd", _tk.huber_fwd)
        _backend.register_triton("huber_bwd", _tk.huber_bwd)


def _impl(backend, op):
    return _backend.impl(backend, _tk, op)


IMPLS["huber"] = (
    lambda be, x, y, w, pw, p, r: _impl(be, "huber_fwd")(x, y, w, *p, r),
    lambda be, go, x, y, w, pw, p, r, gi, gt: _impl(be, "huber_bwd")(go, x, y, w, *p, r, gi, gt),
)


def _check(fn, input, target):
    check_tensor("input", input)
    check_tensor("target", target)
    broadcast_shape("input", input, "target", target)
    check_same_device("input", input, target=target)
    if target.shape != input.shape:
        warnings.warn(f"{fn}: Using a target size ({target.size()}) that is different to the "
                      f"input size ({input.size()}). This will likely lead to incorrect results "
                      "due to broadcasting. Please ensure they have the same size.", stacklevel=3)


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """torch.nn.functional.huber_loss, fused: 0.5 d^2 for |d| < delta, else delta (|d| - delta/2).

    Same arguments, broadcasting (with torch's warning), output dtype and errors (a non-positive
    delta raises ValueError). weight must have the input's shape (as torch); a weight that requires
    grad takes the unfused path weight * loss so that it gets its gradient.
    """
    out = _elementwise.fast(1, input, target, weight, None, delta, False, reduction)
    if out is not None:
        return out
    reduction = resolve_reduction(reduction)
    _check("huber_loss", input, target)
    delta = float(delta)
    if not delta > 0:
        raise FusedLossValueError(
            f"delta must be > 0 (huber_loss does not support non-positive values for "
            f"delta), got {delta}")
    out_dtype = amp_dtype(input)
    if weight is not None:
        check_tensor("weight", weight)
        if weight.shape != input.shape:
            raise FusedLossValueError(
                f"weight must have the input's shape {tuple(input.shape)}, got "
                f"{tuple(weight.shape)}")
        check_same_device("input", input, weight=weight)
        out_dtype = torch.promote_types(out_dtype, amp_dtype(weight))
        if weight.requires_grad:
            loss = ElementwiseLoss.apply("huber", (delta, False), "none", amp_dtype(input), input,
                                         target, None, None) * weight
            return reduce_loss(loss, reduction)
    return ElementwiseLoss.apply("huber", (delta, False), reduction, out_dtype, input, target,
                                 weight, None)


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """torch.nn.functional.smooth_l1_loss, fused: 0.5 d^2 / beta for |d| < beta, else
    |d| - beta/2; beta = 0 is L1. Same arguments, broadcasting, output dtype and errors (a negative
    beta raises ValueError)."""
    if size_average is None and reduce is None:
        out = _elementwise.fast(1, input, target, None, None, beta, True, reduction)
        if out is not None:
            return out
    reduction = resolve_reduction(reduction, size_average, reduce)
    _check("smooth_l1_loss", input, target)
    beta = float(beta)
    if not beta >= 0:
        raise FusedLossValueError(
            f"beta must be >= 0 (smooth_l1_loss does not support negative values for "
            f"beta), got {beta}")
    out_dtype = torch.promote_types(amp_dtype(input), amp_dtype(target))
    return ElementwiseLoss.apply("huber", (beta, True), reduction, out_dtype, input, target, None,
                                 None)
