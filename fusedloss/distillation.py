"""Knowledge distillation from logits: forward KL, reverse KL or the generalised JSD between the
teacher's and the student's softmax at a temperature, times T^2, plus an optional hard-label
cross-entropy; fused (csrc/distillation.cpp on the CPU, kernels/distillation.py on CUDA).

Forward reads both logits rows once (twice for the JSD) and keeps five numbers per row; backward
reads them once more and writes the student's gradient with grad_output and the reduction's
1/denominator folded in (into a new buffer, or over the student's logits with inplace_backward).
No other [tokens, vocab] tensor is allocated. Definitions and choices: README.md, "Distillation".
"""
import math
import numbers

import torch

from . import _backend
from ._common import (OP_REDUCTION_CODE, FusedLossTypeError, FusedLossValueError, amp_dtype,
                      call_or_none, check_class_targets_for, check_same_device, check_tensor,
                      out_dtype, reduce_loss)
from .reference import acc_dtype

_FN = "fusedloss.distillation_loss"
REDUCTIONS = ("none", "batchmean", "sum", "mean")

if _backend.HAS_TRITON:
    from fusedloss.kernels import distillation as _tk
else:
    _tk = None

if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::distillation")
    def _whole_fake(student, teacher, target, temperature, beta, ignore_index, hard_weight,
                    reduction, out_dtype):
        return student.new_empty(student.shape[:-1] if reduction == 0 else (), dtype=out_dtype)

    @torch.library.register_fake("fusedloss::distill_fwd")
    def _fwd_fake(student, teacher, target, temperature, beta, ignore_index, hard_weight):
        acc = acc_dtype(student.dtype)
        rows = student.shape[0]
        return student.new_empty(rows, dtype=acc), student.new_empty((rows, 5), dtype=acc)

    @torch.library.register_fake("fusedloss::distill_bwd")
    def _bwd_fake(grad_scale, student, teacher, target, stats, temperature, beta, ignore_index,
                  hard_weight):
        return student.new_empty(student.shape)

    @torch.library.register_fake("fusedloss::distill_bwd_inplace")
    def _bwd_inplace_fake(grad_scale, student, teacher, target, stats, temperature, beta,
                          ignore_index, hard_weight):
        return None

    if _tk is not None:
        for _name in ("distill_fwd", "distill_bwd", "distill_bwd_inplace"):
            _backend.register_triton(_name, getattr(_tk, _name))


def _impl(name, backend):
    return _backend.impl(backend, _tk, name)


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, target, temperature, beta, ignore_index, hard_weight,
                reduction, inplace):
        V = student.shape[-1]
        s2 = student.reshape(-1, V)  # a view wherever the leading dims merge
        t2 = teacher.to(student.dtype).reshape(-1, V)
        t = None if target is None else target.reshape(-1).long().contiguous()
        acc = acc_dtype(student.dtype)
        if t is not None:
            check_class_targets_for(_FN, _backend.backend_for(s2), s2, t, V, ignore_index)
        opts = (temperature, beta, ignore_index, hard_weight)
        ctx.backend = _backend.backend_for(s2)  # backward runs where forward ran (use_backend)
        loss, stats = _impl("distill_fwd", ctx.backend)(s2, t2, t, *opts)
        denom = None
        if reduction in ("batchmean", "mean"):
            # non-ignored rows (times V for 'mean'), a device tensor: no host sync
            rows = (t != ignore_index).sum(dtype=acc) if t is not None else \
                torch.tensor(float(s2.shape[0]), dtype=acc, device=s2.device)
            denom = rows * V if reduction == "mean" else rows
        out = reduce_loss(loss, "mean" if denom is not None else reduction, denom)
        out = out.view(student.shape[:-1]) if reduction == "none" else out
        ctx.inplace = (inplace and ctx.needs_input_grad[0] and not torch.compiler.is_compiling()
                       and s2.data_ptr() == student.data_ptr())
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(student, t2, t, stats, denom)
        return out.to(amp_dtype(student))  # fp32 for a half input under autocast, as kl_div

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 9
        student, t2, t, stats, denom = ctx.saved_tensors
        s2 = student.reshape(-1, student.shape[-1])
        # grad_output (one per row for 'none'), over the reduction's denominator, in the acc dtype
        scale = grad_out.reshape(-1).to(stats.dtype)
        if denom is not None:
            scale = scale / denom
        scale = scale.contiguous()
        if ctx.inplace:
            # The student's logits receive their gradient; bumping their version makes any
            # later backward that saved them raise instead of reading a gradient as logits.
            _impl("distill_bwd_inplace", ctx.backend)(scale, s2, t2, t, stats, *ctx.opts)
            torch.autograd.graph.increment_version(student)
            return (student,) + (None,) * 8
        grad = _impl("distill_bwd", ctx.backend)(scale, s2, t2, t, stats, *ctx.opts)
        return (grad.view(student.shape),) + (None,) * 8


# The op's Autograd kernel called without the dispatcher, in plain eager calls (csrc/python.cpp).
_direct = getattr(_backend.C_MODULE, "distillation", None)
_NUMBER = (float, int)


def _real(name, v, ok, what):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(float(v)):
        raise FusedLossValueError(f"{name} must be {what}, got {v!r}")
    return float(v)


def distillation_loss(student_logits, teacher_logits, target=None, *, temperature=1.0, beta=0.0,
                      ignore_index=-100, reduction="batchmean", hard_weight=0.0,
                      inplace_backward=False):
    """Distillation loss from raw logits [..., V] (vocab last), fused.

    Per row (token): T^2 * D(teacher, student) at temperature T, where D is
      beta = 0: KL(p_t || p_s) (forward KL, Hinton et al.), beta = 1: KL(p_s || p_t) (reverse),
      0 < beta < 1: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
    with p = softmax(logits / T), plus hard_weight * cross_entropy(student_logits, target) (at
    T = 1). target: class indices of shape [...] (optional; needed for hard_weight > 0); rows
    whose target is ignore_index contribute to neither term nor to the denominators.
    reduction: 'batchmean' (sum / number of non-ignored rows: the mean per token), 'sum',
    'mean' (sum / (non-ignored rows * V), as F.kl_div's 'mean'), 'none' (per row, shape [...]).
    The teacher gets no gradient and must not require grad (ValueError: pass .detach()); a teacher
    of another dtype is converted to the student's (a copy). inplace_backward: backward writes the
    gradient over student_logits (not a leaf) instead of a new buffer, as cross_entropy's.
    """
    if (_direct is not None and not torch.compiler.is_compiling() and not inplace_backward
            and _backend.cpu_op()):
        # Plain CPU tensors in eager mode: the op's autograd kernel called directly.
        out = _direct(student_logits, teacher_logits, target, temperature, beta, ignore_index,
                      hard_weight, reduction)
        if out is not None:
            return out
    if (type(student_logits) is torch.Tensor and type(teacher_logits) is torch.Tensor
            and student_logits.is_cpu and (target is None or type(target) is torch.Tensor)
            and not inplace_backward and type(reduction) is str and type(temperature) in _NUMBER
            and type(beta) in _NUMBER and type(hard_weight) in _NUMBER and _backend.cpu_op()):
        # The common case as one call of the C++ op (see call_or_none).
        code = OP_REDUCTION_CODE.get(reduction)
        if code is not None:
            out = call_or_none(torch.ops.fusedloss.distillation.default, student_logits,
                               teacher_logits, target, float(temperature), float(beta),
                               int(ignore_index), float(hard_weight), code,
                               out_dtype(student_logits))
            if out is not None:
                return out
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits)
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise FusedLossValueError(f"student_logits must have shape [..., V] with V >= 1, got "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise FusedLossValueError(f"teacher_logits must have the student_logits' shape "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    if teacher_logits.requires_grad:
        raise FusedLossValueError("teacher_logits requires grad, but distillation_loss gives the teacher no "
                         "gradient: pass teacher_logits.detach() (or compute it under no_grad)")
    temperature = _real("temperature", temperature, lambda v: v > 0 and math.isfinite(v),
                        "a finite number > 0")
    beta = _real("beta", beta, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    hard_weight = _real("hard_weight", hard_weight, lambda v: v >= 0 and math.isfinite(v),
                        "a finite number >= 0")
    if reduction not in REDUCTIONS:
        raise FusedLossValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; "
                         f"got {reduction!r}")
    if target is not None:
        check_tensor("target", target, floating=False)
        if target.dtype not in (torch.int64, torch.uint8):
            raise FusedLossTypeError(f"target must hold int64 (or uint8) class indices, got {target.dtype}")
        if target.shape != student_logits.shape[:-1]:
            raise FusedLossValueError(f"target must have shape {tuple(student_logits.shape[:-1])} (the "
                             f"logits' without V), got {tuple(target.shape)}")
    elif hard_weight > 0:
        raise FusedLossValueError("hard_weight > 0 needs a target (class indices)")
    check_same_device("student_logits", student_logits, teacher_logits=teacher_logits,
                      target=target)
    if inplace_backward and student_logits.requires_grad and student_logits.is_leaf:
        raise FusedLossValueError("inplace_backward=True overwrites student_logits with their gradient, "
                         "which cannot be done to a leaf tensor that requires grad")
    return _Distill.apply(student_logits, teacher_logits, target, temperature, beta,
                          int(ignore_index), hard_weight, reduction, bool(inplace_backward))
