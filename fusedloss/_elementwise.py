"""Shared by the element-wise losses (bce, huber): broadcasting to strided 4-d views, backend
choice, and the autograd Function.

Operands are broadcast with expand (stride 0, no copy) and viewed as 4-d [D0, D1, D2, D3] after
merging the dims that every operand can merge; the kernels (csrc/elementwise.h,
kernels/_elementwise.py) read those strided views in place. Only a layout that still needs more
than 4 dims is copied to contiguous memory first. The kernels return the loss (per element, or
reduced in fp32) and, when needed, the gradients already scaled by 1/numel for mean; backward
only multiplies by grad_output (and sums over broadcast dims).
"""
import torch

from . import _backend
from .reference import acc_dtype

REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}

# kind -> backend name ("op", "triton", "reference") -> fn(x, y, w, pw, params, reduction,
# grad_input, grad_target) -> (loss, grad_input, grad_target); filled by bce.py / huber.py.
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


def fake_outputs(input, reduction, grad_input, grad_target):
    """The outputs of an element-wise op, for register_fake."""
    loss = (input.new_empty((), dtype=acc_dtype(input.dtype)) if reduction
             else input.new_empty(input.shape))
    gx = input.new_empty(input.shape if grad_input else (0,))
    gy = input.new_empty(input.shape if grad_target else (0,))
    return loss, gx, gy


def broadcast_shape(name_a, a, name_b, b):
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"{name_b} of shape {tuple(b.shape)} does not broadcast with {name_a} of "
                         f"shape {tuple(a.shape)}") from None


class ElementwiseLoss(torch.autograd.Function):
    """apply(kind, params, reduction, out_dtype, input, target, weight, pos_weight).

    input and target broadcast (both get gradients, summed back to their shapes); weight and
    pos_weight broadcast to that shape and get none. The kernels run in the promoted dtype of
    input and target, with fp32 (fp64 for fp64) math; the loss is returned in out_dtype.
    """

    @staticmethod
    def forward(ctx, kind, params, reduction, out_dtype, input, target, weight, pos_weight):
        shape = torch.broadcast_shapes(input.shape, target.shape)
        dtype = torch.promote_types(input.dtype, target.dtype)
        acc = acc_dtype(dtype)
        x = input.to(dtype).expand(shape)
        y = target.to(dtype).expand(shape)
        w = None if weight is None else weight.to(acc).expand(shape)
        pw = None if pos_weight is None else pos_weight.to(acc).expand(shape)
        need_gx, need_gy = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        x4, y4, w4, pw4 = view4(x, y, w, pw)
        impl = IMPLS[kind][_backend.backend_for(x4)]
        loss, gx, gy = impl(x4, y4, w4, pw4, params, REDUCTION_CODE[reduction], need_gx, need_gy)
        ctx.set_materialize_grads(False)
        ctx.shapes = (input.shape, target.shape)
        ctx.save_for_backward(gx.view(shape) if need_gx else None,
                              gy.view(shape) if need_gy else None)
        out = loss.view(shape) if reduction == "none" else loss
        return out.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 8
        grads = []
        for g, shape in zip(ctx.saved_tensors, ctx.shapes):
            if g is not None:
                # In place on the saved buffer (full-shape grad_out for 'none', 0-dim otherwise);
                # a second backward through the same graph then raises rather than rescaling.
                g = g.mul_(grad_out)
                if g.shape != shape:
                    g = g.sum_to_size(shape)
            grads.append(g)
        return (None, None, None, None, grads[0], grads[1], None, None)
