"""Softmax cross-entropy over class-index targets: one program per row.

Forward reads the row once (online lse, x[y], sum_c w_c x_c for label smoothing); backward reads it
once more and writes the gradient from the saved lse, with grad_output folded in. Same contract and
formulas as csrc/cross_entropy.cpp:
  L       = (1-eps) w_y (lse - x_y) + eps/C (W lse - sum_c w_c x_c) + z lse^2
  dL/dx_j = p_j A - eps/C w_j - (1-eps) w_y [j == y],   A = (1-eps) w_y + eps/C W + 2 z lse
with the target column written as A expm1(x_y - lse) + eps/C (W - w_y) + 2 z lse (no p_y - 1).
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, expm1, online_lse_step, row_block, tl_acc


@triton.jit
def _row_setup(X, stride_xn, stride_xd, D, TARGET, WEIGHT, C, ignore_index,
               HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """Row pointer, target (0 when invalid), validity, x_y and w_y of this program's row."""
    row = tl.program_id(0).to(tl.int64)
    n = row // D
    x_row = X + n * stride_xn + (row - n * D) * stride_xd
    y = tl.load(TARGET + row)
    # Out-of-range targets are reported on the host (eager) before launch; here they only must
    # not read out of bounds, so they are treated like ignored rows.
    valid = (y != ignore_index) & (y >= 0) & (y < C)
    y = tl.where(valid, y, 0)
    w_y = tl.load(WEIGHT + y).to(ACC) if HAS_WEIGHT else 1.0
    return row, x_row, y, valid, w_y


@triton.jit
def _cross_entropy_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd, D, TARGET, WEIGHT, LOSS, LSE,
    C, ignore_index, label_smoothing, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row, x_row, y, valid, w_y = _row_setup(X, stride_xn, stride_xd, D, TARGET, WEIGHT, C,
                                           ignore_index, HAS_WEIGHT, ACC)
    c_read = tl.where(valid, C, 0)  # columns to read: none for ignored rows
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    swx = tl.zeros((), ACC)
    w_sum = tl.zeros((), ACC)
    for off in range(0, C, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols * stride_xc, mask=cols < c_read, other=0.0).to(ACC)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(WEIGHT + cols, mask=cols < C, other=0.0).to(ACC)
                swx += tl.sum(w * x, 0)
                w_sum += tl.sum(w, 0)
            else:
                swx += tl.sum(x, 0)
        m, s = online_lse_step(m, s, tl.where(cols < C, x, float("-inf")))
    lse = m + tl.log(s)
    if not HAS_WEIGHT:
        w_sum = w_sum + C  # W = C without weights
    x_y = tl.load(x_row + y * stride_xc).to(ACC)
    # Terms with a zero coefficient are dropped, not multiplied by 0: lse may be huge (inf * 0).
    loss = (1.0 - label_smoothing) * w_y * (lse - x_y)
    if HAS_SMOOTHING:
        loss += label_smoothing / C * (w_sum * lse - swx)
    loss += tl.where(z_loss != 0.0, z_loss * lse * lse, 0.0)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, tl.where(valid, lse, 0.0))


@triton.jit
def _cross_entropy_bwd_kernel(
    X, stride_xn, stride_xc, stride_xd, D, TARGET, WEIGHT, LSE, GRAD_SCALE, W_SUM,
    G, stride_gn, stride_gc, stride_gd,
    C, ignore_index, label_smoothing, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row, x_row, y, valid, w_y = _row_setup(X, stride_xn, stride_xd, D, TARGET, WEIGHT, C,
                                           ignore_index, HAS_WEIGHT, ACC)
    k = label_smoothing / C
    w_sum = tl.load(W_SUM).to(ACC) if HAS_WEIGHT else tl.zeros((), ACC) + C
    lse = tl.load(LSE + row).to(ACC)
    scale = tl.load(GRAD_SCALE + row).to(ACC) if PER_ROW_SCALE else tl.load(GRAD_SCALE).to(ACC)
    a = (1.0 - label_smoothing) * w_y + k * w_sum + 2.0 * z_loss * lse
    x_y = tl.load(x_row + y * stride_xc).to(ACC)  # before the sweep: g may alias x
    g_y = a * expm1(x_y - lse) + k * (w_sum - w_y) + 2.0 * z_loss * lse
    c_read = tl.where(valid, C, 0)
    g_row = G + (row // D) * stride_gn + (row % D) * stride_gd
    for off in range(0, C, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols * stride_xc, mask=cols < c_read, other=0.0).to(ACC)
        g = tl.exp(x - lse) * a
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= k * tl.load(WEIGHT + cols, mask=cols < C, other=0.0).to(ACC)
            else:
                g -= k
        g = tl.where(cols == y, g_y, g) * scale
        g = tl.where(valid, g, 0.0)
        tl.store(g_row + cols * stride_gc, g.to(G.dtype.element_ty), mask=cols < C)


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss):
    """Per-row (loss, lse) in the acc dtype for logits [N, C, D] and target [N*D] int64."""
    N, C, D = logits.shape
    rows = N * D
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    if rows == 0:
        return loss, lse
    block, num_warps = row_block(C)
    _cross_entropy_fwd_kernel[(rows,)](
        logits, *logits.stride(), D, target, weight if weight is not None else loss, loss, lse,
        C, ignore_index, float(label_smoothing), float(z_loss),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0,
        ACC=tl_acc(logits.dtype), BLOCK=block, num_warps=num_warps,
    )
    return loss, lse


def cross_entropy_bwd(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing,
                      z_loss, grad=None):
    """Gradient of the per-row loss times grad_scale (a scalar or one per row), into `grad`
    (the logits themselves for the in-place variant) or a new contiguous tensor."""
    N, C, D = logits.shape
    if grad is None:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N * D == 0:
        return grad
    block, num_warps = row_block(C)
    w_sum = weight.sum() if weight is not None else lse  # a device scalar: no host sync
    _cross_entropy_bwd_kernel[(N * D,)](
        logits, *logits.stride(), D, target, weight if weight is not None else lse, lse,
        grad_scale, w_sum, grad, *grad.stride(),
        C, ignore_index, float(label_smoothing), float(z_loss),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0,
        PER_ROW_SCALE=grad_scale.numel() != 1, ACC=tl_acc(logits.dtype), BLOCK=block,
        num_warps=num_warps,
    )
    return grad


def cross_entropy_bwd_inplace(grad_scale, logits, target, lse, weight, ignore_index,
                              label_smoothing, z_loss):
    cross_entropy_bwd(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing,
                      z_loss, grad=logits)
