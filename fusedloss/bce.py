"""Weighted BCE-with-logits: a drop-in for torch.nn.functional.binary_cross_entropy_with_logits.

Fused element-wise kernels (csrc/bce.cpp on the CPU, kernels/bce.py on CUDA): forward reads input
and target once and writes the loss (or fp32 partial sums); backward reads them once more and
writes the gradients for input (and target, when it requires grad) with grad_output folded in.
Everything is built from e = exp(-|x|), so the tiny terms at |x| ~ 40 survive on both branches. weight and pos_weight are broadcast views (stride 0, never
copied to the input's size); they get no gradient, as in torch.
"""
import torch

from . import _backend
from ._common import (FusedLossValueError, amp_dtype, check_same_device, check_tensor,
                      resolve_reduction)
from . import _elementwise
from ._elementwise import IMPLS, ElementwiseLoss, fake_bwd, fake_fwd

if _backend.HAS_TRITON:
    from fusedloss.kernels import bce as _tk
else:
    _tk = None

if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::bce_fwd")
    def _bce_fwd_fake(input, target, weight, pos_weight, reduction):
        return fake_fwd(input, reduction)

    @torch.library.register_fake("fusedloss::bce_bwd")
    def _bce_bwd_fake(grad_out, input, target, weight, pos_weight, reduction, grad_input,
                      grad_target):
        return fake_bwd(input, grad_input, grad_target)

    if _tk is not None:
        _backend.register_triton("bce_fwd", _tk.bce_fwd)
        _backend.register_triton("bce_bwd", _tk.bce_bwd)


def _impl(backend, op):
    return _backend.impl(backend, _tk, op)


IMPLS["bce"] = (
    lambda be, x, y, w, pw, p, r: _impl(be, "bce_fwd")(x, y, w, pw, r),
    lambda be, go, x, y, w, pw, p, r, gi, gt: _impl(be, "bce_bwd")(go, x, y, w, pw, r, gi, gt),
)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """torch.nn.functional.binary_cross_entropy_with_logits, fused. Same arguments, shapes, output
    dtype (the target's) and errors (as ValueError / TypeError naming the argument).

    target: same shape as input, soft targets allowed. weight, pos_weight: broadcast to the input
    (aligned from the last dimension: for (N, C, H, W) a per-class pos_weight is (C, 1, 1)), never
    enlarging it. mean = sum / numel (weights are not normalised).
    """
    if size_average is None and reduce is None:
        out = _elementwise.fast(0, input, target, weight, pos_weight, 0.0, False, reduction)
        if out is not None:
            return out
    reduction = resolve_reduction(reduction, size_average, reduce)
    check_tensor("input", input)
    check_tensor("target", target)
    if target.shape != input.shape:
        raise FusedLossValueError(f"Target size ({target.size()}) must be the same as input size "
                                  f"({input.size()})")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        check_tensor(name, t)
        try:
            fits = torch.broadcast_shapes(t.shape, input.shape) == input.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise FusedLossValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast to the input's "
                f"shape {tuple(input.shape)}")
        if t.requires_grad:
            raise FusedLossValueError(
                f"{name} requires grad, but binary_cross_entropy_with_logits is not "
                f"differentiable with respect to {name} (as in torch)")
    check_same_device("input", input, target=target, weight=weight, pos_weight=pos_weight)
    return ElementwiseLoss.apply("bce", (), reduction, amp_dtype(target), input, target, weight,
                                 pos_weight)
