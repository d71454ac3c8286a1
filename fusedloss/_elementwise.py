"""Shared by the element-wise losses (bce, huber): broadcasting to strided 4-d views, backend
choice, and the autograd Function.

Operands are broadcast with expand (stride 0, no copy) and viewed as 4-d [D0, D1, D2, D3] after
merging the dims that every operand can merge; the kernels (csrc/elementwise.h,
kernels/_elementwise.py) read those strided views in place. Only a layout that still needs more
than 4 dims is copied to contiguous memory first. Forward returns the loss (per element, or
reduced in fp32); backward re-reads the inputs and returns the gradients with grad_output and
1/numel (for mean) folded in, in fp32 (then sums over broadcast dims).
"""
import torch

from . import _backend
from ._common import (OP_REDUCTION_CODE, REDUCTION_CODE, FusedLossValueError, call_or_none,
                      out_dtype)
from .reference import acc_dtype

# kind -> (fwd, bwd), filled by bce.py / huber.py, with backend = _backend.backend_for(x):
#   fwd(backend, x, y, w, pw, params, reduction) -> loss
#   bwd(backend, grad_out, x, y, w, pw, params, reduction, grad_input, grad_target) -> (gx, gy)
IMPLS = {}


def view4(*tensors):
    """4-d views of tensors of one shape (None allowed) with every dim that all of them can merge
    merged and size-1 dims dropped; no copy unless more than 4 dims remain."""
    present = [t for t in tensors if t is not None]
    shape = present[0].shape
    dims = []  # (size, [stride per present tensor])
    for i, size in enumerate(shape):
        if size == 1:
            continue
        st = [t.stride(i) for t in present]
        if dims and all(ps == s * size for ps, s in zip(dims[-1][1], st)):
            dims[-1] = (dims[-1][0] * size, st)
        else:
            dims.append((size, st))
    if len(dims) > 4:  # rare layouts: copy, then one contiguous dim
        present = [t.contiguous() for t in present]
        dims = [(present[0].numel(), [1] * len(present))]
    sizes = [1] * (4 - len(dims)) + [d[0] for d in dims]
    # Each merge above is stride-compatible for every tensor, so reshape returns views.
    views = iter(t.reshape(sizes) for t in present)
    return [None if t is None else next(views) for t in tensors]


def fake_fwd(input, reduction):
    """The forward op's output, for register_fake."""
    if reduction:
        return input.new_empty((), dtype=acc_dtype(input.dtype))
    return input.new_empty(input.shape)


def fake_bwd(input, grad_input, grad_target):
    """The backward op's outputs, for register_fake."""
    return (input.new_empty(input.shape if grad_input else (0,)),
            input.new_empty(input.shape if grad_target else (0,)))


def broadcast_shape(name_a, a, name_b, b):
    if a.shape == b.shape:  # torch.broadcast_shapes costs more than a small loss itself
        return a.shape
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise FusedLossValueError(
            f"{name_b} of shape {tuple(b.shape)} does not broadcast with {name_a} of "
            f"shape {tuple(a.shape)}") from None


class ElementwiseLoss(torch.autograd.Function):
    """apply(kind, params, reduction, out_dtype, input, target, weight, pos_weight).

    input and target broadcast (both get gradients, summed back to their shapes); weight and
    pos_weight broadcast to that shape and get none. The kernels run in the promoted dtype of
    input and target, with fp32 (fp64 for fp64) math; the loss is returned in out_dtype.
    Forward writes only the loss; backward re-reads the inputs (views, nothing copied or kept
    beyond them) and writes the gradients with grad_output and 1/numel folded in, in fp32.
    """

    @staticmethod
    def forward(ctx, kind, params, reduction, out_dtype, input, target, weight, pos_weight):
        shape = torch.broadcast_shapes(input.shape, target.shape)
        dtype = torch.promote_types(input.dtype, target.dtype)
        if reduction == "none" and out_dtype == torch.float32 and dtype != out_dtype:
            # Under autocast a half input gives an fp32 loss, and 'none' stores it per element
            # in the kernel's dtype: run on fp32 copies (the size of that output anyway) so that
            # it is not rounded to half first. mean and sum read the half input in place.
            dtype = out_dtype
        acc = acc_dtype(dtype)
        x = input.to(dtype).expand(shape)
        y = target.to(dtype).expand(shape)
        w = None if weight is None else weight.to(acc).expand(shape)
        pw = None if pos_weight is None else pos_weight.to(acc).expand(shape)
        x4, y4, w4, pw4 = view4(x, y, w, pw)
        fwd, _ = IMPLS[kind]
        ctx.backend = _backend.backend_for(x4)  # backward runs where forward ran (use_backend)
        loss = fwd(ctx.backend, x4, y4, w4, pw4, params, REDUCTION_CODE[reduction])
        ctx.set_materialize_grads(False)
        ctx.kind, ctx.params, ctx.reduction = kind, params, reduction
        ctx.shapes = (input.shape, target.shape)
        ctx.save_for_backward(x, y, w, pw)
        out = loss.view(shape) if reduction == "none" else loss
        return out.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need_gx, need_gy = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        if grad_out is None or not (need_gx or need_gy):
            return (None,) * 8
        x, y, w, pw = ctx.saved_tensors
        # A full-shape grad_output for 'none', a 0-dim one (expanded: no copy) otherwise.
        go = grad_out.to(x.dtype).expand(x.shape)
        x4, y4, w4, pw4, go4 = view4(x, y, w, pw, go)
        _, bwd = IMPLS[ctx.kind]
        gx, gy = bwd(ctx.backend, go4, x4, y4, w4, pw4, ctx.params,
                     REDUCTION_CODE[ctx.reduction], need_gx, need_gy)
        grads = []
        for g, need, shape in ((gx, need_gx, ctx.shapes[0]), (gy, need_gy, ctx.shapes[1])):
            if need:
                g = g.view(x.shape)
                g = g if g.shape == shape else g.sum_to_size(shape)
            grads.append(g if need else None)
        return (None, None, None, None, grads[0], grads[1], None, None)


if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::elementwise_loss")
    def _whole_fake(kind, input, target, weight, pos_weight, delta, flag, reduction, out_dtype):
        return input.new_empty(input.shape if reduction == 0 else (), dtype=out_dtype)

# The op's Autograd kernel called without the dispatcher, in plain eager calls (csrc/python.cpp).
_direct = getattr(_backend.C_MODULE, "elementwise_loss", None)


def fast(kind, input, target, weight, pos_weight, delta, flag, reduction):
    """The common case as one call of fusedloss::elementwise_loss (kind 0 BCE, 1 Huber /
    SmoothL1 (flag), 2 KL divergence (flag: log_target; reduction 'batchmean' too)), which runs
    the kernels and the autograd in C++ and checks the arguments itself: a
    small batch's time is per-call overhead. None where it does not apply or the op rejects the
    arguments (input and target of other shapes or dtypes, a weight that needs a gradient, bad
    values): the caller then takes its full path, whose checks name the bad argument. The result's
    dtype is out_dtype(input) (with one dtype for input and target, what every functional here
    returns)."""
    if _direct is not None and not torch.compiler.is_compiling() and _backend.cpu_op():
        out = _direct(kind, input, target, weight, pos_weight, delta, flag, reduction)
        if out is not None:
            return out
    if (type(input) is torch.Tensor and type(target) is torch.Tensor and input.is_cpu
            and type(reduction) is str and _backend.cpu_op()):
        code = OP_REDUCTION_CODE.get(reduction)
        if code is not None:
            return call_or_none(torch.ops.fusedloss.elementwise_loss.default, kind, input,
                                target, weight, pos_weight, float(delta), bool(flag), code,
                                out_dtype(input))
    return None
