"""KL divergence: a drop-in for torch.nn.functional.kl_div.

One fused element-wise pass (csrc/kl_div.cpp on the CPU, kernels/kl_div.py on CUDA, over the
shared element-wise driver of bce / huber): forward reads input and target once and writes the
loss (or fp32 partial sums); backward reads them once more and writes the gradients for input and
(when it requires grad) target with grad_output folded in. Torch's semantics: input holds
log-probabilities, target probabilities (log-probabilities with log_target=True); broadcasting;
'batchmean' = sum / input.size(0); torch's warning for 'mean'. One deliberate difference: a zero
target (0, or -inf with log_target) contributes 0 where torch's 0 * inf gives NaN.
"""
import warnings

import torch

from . import _backend, _elementwise
from ._common import (FusedLossTypeError, FusedLossValueError, amp_dtype, check_same_device,
                      check_tensor, resolve_reduction)
from ._elementwise import IMPLS, ElementwiseLoss, broadcast_shape, fake_bwd, fake_fwd

if _backend.HAS_TRITON:
    from fusedloss.kernels import kl_div as _tk
else:
    _tk = None

if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::kl_div_fwd")
    def _kl_div_fwd_fake(input, target, log_target, reduction):
        return fake_fwd(input, reduction)

    @torch.library.register_fake("fusedloss::kl_div_bwd")
    def _kl_div_bwd_fake(grad_out, input, target, log_target, reduction, grad_input, grad_target):
        return fake_bwd(input, grad_input, grad_target)

    if _tk is not None:
        _backend.register_triton("kl_div_fwd", _tk.kl_div_fwd)
        _backend.register_triton("kl_div_bwd", _tk.kl_div_bwd)


def _impl(backend, op):
    return _backend.impl(backend, _tk, op)


IMPLS["kl_div"] = (
    lambda be, x, y, w, pw, p, r: _impl(be, "kl_div_fwd")(x, y, *p, r),
    lambda be, go, x, y, w, pw, p, r, gi, gt: _impl(be, "kl_div_bwd")(go, x, y, *p, r, gi, gt),
)

# torch's text, word for word (torch.nn.functional.kl_div)
_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release.")


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """torch.nn.functional.kl_div, fused: sum of target * (log(target) - input) terms.

    input: log-probabilities; target: probabilities, or log-probabilities if log_target (more
    stable: no log of the target is taken). input and target broadcast as torch's; both get
    gradients. reduction: 'none' | 'batchmean' (sum / input.size(0), the KL divergence per
    sample) | 'sum' | 'mean' (sum / number of elements, with torch's warning). The legacy
    size_average / reduce override reduction, as in torch. The result has the promoted dtype of
    input and target.
    """
    if (size_average is None and reduce is None and reduction != "mean"
            and type(log_target) is bool):
        out = _elementwise.fast(2, input, target, None, None, 0.0, log_target, reduction)
        if out is not None:
            return out
    if size_average is not None or reduce is not None:
        reduction = resolve_reduction("mean", size_average, reduce)
    else:
        if reduction == "mean":
            warnings.warn(_MEAN_WARNING, stacklevel=2)
        if reduction not in ("none", "batchmean", "sum", "mean"):
            raise FusedLossValueError(f"reduction must be one of 'none', 'batchmean', 'sum', 'mean'; "
                             f"got {reduction!r}")
    check_tensor("input", input)
    check_tensor("target", target, floating=False)
    if target.is_complex():
        raise FusedLossTypeError(f"target must be real, got {target.dtype}")
    broadcast_shape("input", input, "target", target)
    check_same_device("input", input, target=target)
    # (under autocast torch computes kl_div in fp32 and returns fp32: amp_dtype)
    out_dtype = torch.promote_types(amp_dtype(input), amp_dtype(target))
    kernel_reduction = "sum" if reduction == "batchmean" else reduction
    out = ElementwiseLoss.apply("kl_div", (bool(log_target),), kernel_reduction, out_dtype,
                                input, target, None, None)
    if reduction == "batchmean" and input.dim() != 0:
        out = out / input.size(0)
    return out
