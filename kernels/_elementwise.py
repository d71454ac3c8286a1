"""Shared by the element-wise loss kernels (bce, huber): 4-d strided addressing and the launcher.

Same contract as csrc/elementwise.h: input and target are strided views of one [D0, D1, D2, D3]
index space (stride 0 along broadcast dims), weights likewise in the accumulation dtype; each
program handles BLOCK consecutive flat indices and writes, in forward, the per-element loss or
one fp32 partial sum and, in backward, the gradients (contiguous) times grad_out. Partials are
summed by torch.sum: a fixed grid and a fixed reduction order, so the result is deterministic.
When every operand is contiguous (the common case) the kernels specialise on CONTIG and address
by the flat index alone: the per-element 64-bit div/mod of coords4 costs more than the loss.
"""
import torch
import triton
import triton.language as tl

from ._common import INTERPRET, acc_dtype, device_guard, tl_acc


def elem_block(numel: int):
    """BLOCK and num_warps: 1024 per program on a GPU; the interpreter runs one numpy op per
    block, so there a wide block is simply faster."""
    cap = 1 << 16 if INTERPRET else 1024
    block = min(triton.next_power_of_2(max(numel, 1)), cap)
    return block, 4


@triton.jit
def coords4(idx, D1, D2, D3, CONTIG: tl.constexpr = False):
    """Coordinates of flat indices in [D0, D1, D2, D3] (row-major). CONTIG (every operand
    contiguous, see launch): load4 and finish address by idx alone, so skip the 64-bit div/mod."""
    if CONTIG:
        return idx, idx, idx, idx
    i3 = idx % D3
    r = idx // D3
    i2 = r % D2
    r = r // D2
    return r // D1, r % D1, i2, i3


@triton.jit
def load4(P, i0, i1, i2, i3, s0, s1, s2, s3, mask, ACC: tl.constexpr, CONTIG: tl.constexpr = False):
    """Load at the coordinates from coords4 (CONTIG: i0 is the flat index itself)."""
    if CONTIG:
        return tl.load(P + i0, mask=mask, other=0.0).to(ACC)
    return tl.load(P + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3, mask=mask, other=0.0).to(ACC)


def launch(kernel, x, y, w, pw, go, reduction, want_loss, grad_input, grad_target, *params,
           **consts):
    """Run `kernel` over 4-d x, y (w, pw: None or the same shape in the acc dtype; go: None in
    forward, grad_out as a 4-d view in x's dtype in backward).

    Returns (loss, grad_input, grad_target) as csrc/elementwise.h's elementwise_run: loss per
    element in x's dtype (contiguous) or the reduced 0-dim value in the acc dtype; gradients
    contiguous; whatever was not asked for is empty.
    """
    numel = x.numel()
    acc = acc_dtype(x.dtype)
    block, num_warps = elem_block(numel)
    # grad_out of a reduced loss is a 0-dim value expanded (all strides 0): load it once.
    go_scalar = go is not None and all(st == 0 for st in go.stride())
    # One flat run (every operand contiguous over x's shape): flat index = offset, no div/mod.
    contig = all(t.is_contiguous() for t in (x, y, w, pw) if t is not None) and (
        go is None or go_scalar or go.is_contiguous())
    grid = triton.cdiv(numel, block)
    reduce = reduction != 0
    dev = x.device
    if not want_loss:
        loss = torch.empty(0, dtype=x.dtype, device=dev)
    elif reduce:
        loss = torch.empty(grid, dtype=acc, device=dev)  # one partial sum per program
    else:
        loss = torch.empty(x.shape, dtype=x.dtype, device=dev)
    gx = torch.empty(x.shape if grad_input else (0,), dtype=x.dtype, device=dev)
    gy = torch.empty(x.shape if grad_target else (0,), dtype=x.dtype, device=dev)
    if numel > 0:
        with device_guard(x):
            zeros = (0, 0, 0, 0)
            kernel[(grid,)](
                x, y, x if w is None else w, x if pw is None else pw, x if go is None else go,
                loss, gx, gy, numel, x.shape[1], x.shape[2], x.shape[3],
                *x.stride(), *y.stride(), *(zeros if w is None else w.stride()),
                *(zeros if pw is None else pw.stride()), *(zeros if go is None else go.stride()),
                *params,
                HAS_W=w is not None, HAS_PW=pw is not None, REDUCTION=reduction,
                COMPUTE_LOSS=want_loss, GRAD_X=grad_input, GRAD_Y=grad_target,
                ACC=tl_acc(x.dtype), BLOCK=block, num_warps=num_warps, **consts,
                **({"CONTIG": contig, "GO_SCALAR": go_scalar} if "CONTIG" in kernel.arg_names
                   else {}),  # a kernel written before the contiguous path: strided only
            )
    if want_loss and reduce:
        loss = loss.sum()  # 0 partials: 0, and mean of nothing is NaN below, as torch's
        if reduction == 1:
            loss = loss / numel
    return loss, gx, gy


@triton.jit
def finish(LOSS, GX, GY, GO, pid, idx, i0, i1, i2, i3, sg0, sg1, sg2, sg3, mask, loss, gx, gy,
           numel, REDUCTION: tl.constexpr, COMPUTE_LOSS: tl.constexpr, GRAD_X: tl.constexpr,
           GRAD_Y: tl.constexpr, ACC: tl.constexpr, CONTIG: tl.constexpr = False,
           GO_SCALAR: tl.constexpr = False):
    """Forward: store the loss (or this block's partial sum). Backward: store the gradients times
    grad_out (GO_SCALAR: one value for all, loaded once) and, for mean, 1/numel, multiplied in
    the acc dtype."""
    if COMPUTE_LOSS:
        if REDUCTION == 0:
            tl.store(LOSS + idx, loss.to(LOSS.dtype.element_ty), mask=mask)
        else:
            tl.store(LOSS + pid, tl.sum(tl.where(mask, loss, 0.0), 0))
    if GRAD_X or GRAD_Y:
        if GO_SCALAR:
            s = tl.load(GO).to(ACC)
        else:
            s = load4(GO, i0, i1, i2, i3, sg0, sg1, sg2, sg3, mask, ACC, CONTIG)
        if REDUCTION == 1:
            s = s * (tl.full((), 1.0, ACC) / numel)
        if GRAD_X:
            tl.store(GX + idx, (gx * s).to(GX.dtype.element_ty), mask=mask)
        if GRAD_Y:
            tl.store(GY + idx, (gy * s).to(GY.dtype.element_ty), mask=mask)
