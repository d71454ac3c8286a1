"""Softmax cross-entropy: a drop-in for torch.nn.functional.cross_entropy.

Class-index targets run one fused kernel pass per row (csrc/cross_entropy.cpp on the CPU,
kernels/cross_entropy.py on CUDA) that yields the row loss and, when a gradient is needed, the
gradient already scaled for the reduction; backward only multiplies by grad_output.
Probability targets take a plain-PyTorch path (fp32 math).
"""
import torch

from . import _backend, reference
from ._common import (check_class_targets, check_same_device, check_tensor, reduce_loss,
                      resolve_reduction)
from .reference import acc_dtype

_FN = "fusedloss.cross_entropy"

if _backend.HAS_TRITON:
    from fusedloss.kernels import cross_entropy as _tk
else:
    _tk = None

if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::cross_entropy_fwd")
    def _fwd_fake(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                  compute_grad):
        rows = logits.shape[0] * logits.shape[2]
        acc = acc_dtype(logits.dtype)
        grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
        return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc), grad

    @torch.library.register_fake("fusedloss::cross_entropy_fwd_inplace")
    def _fwd_inplace_fake(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss):
        rows = logits.shape[0] * logits.shape[2]
        acc = acc_dtype(logits.dtype)
        return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)

    if _tk is not None:

        def _fwd_inplace_triton(logits, target, weight, grad_scale, ignore_index,
                                label_smoothing, z_loss):
            loss, lse, _ = _tk.cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index,
                                                 label_smoothing, z_loss, True, grad=logits)
            return loss, lse

        _backend.register_triton("cross_entropy_fwd", _tk.cross_entropy_fwd)
        _backend.register_triton("cross_entropy_fwd_inplace", _fwd_inplace_triton)


def _rows3d(input: torch.Tensor) -> torch.Tensor:
    """View input as [N, C, D]: (C,) -> (1, C, 1), (N, C) -> (N, C, 1), (N, C, d1..dk) -> (N, C, D).

    Keeps the input's strides (no copy) except where the spatial dims cannot be merged.
    """
    if input.dim() == 1:
        return input.view(1, -1, 1) if input.is_contiguous() else input.unsqueeze(0).unsqueeze(-1)
    if input.dim() == 2:
        return input.unsqueeze(-1)
    return input.flatten(2)


def _ce_rows(x3, t, w, scale, ignore_index, eps, z, compute_grad, inplace):
    """Per-row loss and lse (acc dtype) and the gradient, from the backend for x3's device."""
    be = _backend.backend_for(x3)
    if (be != "op" or x3.device.type != "cpu") and _backend.eager_checks_enabled(t):
        # The C++ kernel checks while it reads; elsewhere check here, in eager mode only.
        check_class_targets(_FN, t, x3.shape[1], ignore_index)
    if be == "op":
        if inplace:
            loss, lse = torch.ops.fusedloss.cross_entropy_fwd_inplace(x3, t, w, scale, ignore_index,
                                                                      eps, z)
            return loss, lse, x3
        return torch.ops.fusedloss.cross_entropy_fwd(x3, t, w, scale, ignore_index, eps, z,
                                                     compute_grad)
    impl = _tk.cross_entropy_fwd if be == "triton" else reference.cross_entropy_fwd
    return impl(x3, t, w, scale, ignore_index, eps, z, compute_grad, grad=x3 if inplace else None)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, label_smoothing, z_loss, reduction,
                inplace):
        x3 = _rows3d(input)
        n_classes = x3.shape[1]
        t = target.reshape(-1).long().contiguous()
        acc = acc_dtype(input.dtype)
        w = None if weight is None else weight.to(acc).contiguous()
        compute_grad = ctx.needs_input_grad[0]
        # Written in place only where x3 really is the input's memory, and not under
        # torch.compile (which plans its own buffers).
        inplace = (inplace and compute_grad and not torch.compiler.is_compiling()
                   and x3.data_ptr() == input.data_ptr())
        denom = scale = None
        if reduction == "mean":
            # sum of w[y] (or the count) over non-ignored rows, kept on the device: no host sync.
            valid = t != ignore_index
            if w is None:
                denom = valid.sum(dtype=acc)
            else:
                denom = torch.where(valid, w[t.clamp(0, n_classes - 1)], 0.0).sum()
            scale = denom.reciprocal()
        loss, _, grad = _ce_rows(x3, t, w, scale, ignore_index, label_smoothing, z_loss,
                                 compute_grad, inplace)
        out = reduce_loss(loss, reduction, denom)
        out = out.view(target.shape) if reduction == "none" else out
        out = out.to(input.dtype)
        ctx.reduction, ctx.inplace = reduction, inplace
        ctx.set_materialize_grads(False)
        if compute_grad:
            # The gradient with the input's shape (the input itself when written in place).
            ctx.save_for_backward(input if inplace else grad.view(input.shape))
        if inplace:
            # The logits now hold the gradient: mark them so that autograd raises, rather than
            # silently computing garbage, if anything else saved them for its backward.
            ctx.mark_dirty(input)
            return out, input
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_):
        (grad,) = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 8
        if ctx.reduction == "none":  # one factor per row: broadcast over the class dim
            g3 = _rows3d(grad)
            grad_out = grad_out.reshape(g3.shape[0], 1, g3.shape[2])
        else:
            g3 = grad
        if ctx.inplace:
            # The lean path: scale the buffer that already holds the logits' memory. The graph
            # through this loss can then be backpropagated once (a second time raises).
            g3.mul_(grad_out)
            return grad, None, None, None, None, None, None, None
        # Out of place, so that retain_graph / gradcheck can backpropagate again.
        return (g3 * grad_out).view(grad.shape), None, None, None, None, None, None, None


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
    return reduce_loss(loss, reduction).to(input.dtype)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, inplace_backward=False):
    """torch.nn.functional.cross_entropy, fused. Same arguments, shapes, dtypes and errors.

    Extras (keyword-only, off by default):
      z_loss: coefficient s of an auxiliary s * logsumexp(row)^2 per non-ignored row (PaLM's
        z-loss), reduced like the main term.
      inplace_backward: write the gradient over `input` to save a logits-sized buffer (class-index
        targets, when input needs a gradient). `input` is overwritten; autograd raises if anything
        else saved it for backward. Ignored under torch.compile.
    Target range: checked on every backend; on CUDA the check reads the target on the host in
    eager mode and is skipped under torch.compile / CUDA-graph capture (out-of-range rows then
    contribute 0 instead of raising).
    """
    reduction = resolve_reduction(reduction, size_average, reduce)
    check_tensor("input", input)
    check_tensor("target", target, floating=False)
    if input.dim() == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ..., dk); got a scalar")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if n_classes < 1:
        raise ValueError(f"input must have at least one class, got shape {tuple(input.shape)}")
    if weight is not None:
        check_tensor("weight", weight)
        if weight.dim() != 1 or weight.numel() != n_classes:
            raise ValueError(f"weight must have shape ({n_classes},) (one per class), "
                             f"got {tuple(weight.shape)}")
    check_same_device("input", input, target=target, weight=weight)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")

    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"probability target must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        return _cross_entropy_probs(input, target, weight, reduction, label_smoothing, z_loss)
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"target must hold int64 (or uint8) class indices or floating-point "
                        f"probabilities, got {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.shape != expected:
        raise ValueError(f"target must have shape {tuple(expected)} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if inplace_backward and input.requires_grad and input.is_leaf:
        raise ValueError("inplace_backward=True overwrites input with its gradient, which autograd "
                         "forbids for a leaf tensor that requires grad")
    out = _CrossEntropy.apply(input, target, weight, int(ignore_index), float(label_smoothing),
                              float(z_loss), reduction, bool(inplace_backward))
    return out[0] if isinstance(out, tuple) else out
