"""Softmax cross-entropy over class-index targets: one program per row, or for C <= ROWS_MAX_C
several whole rows per program in a [ROWS, BLOCK] tile (_common.rows_block).

Forward reads the row once (online lse, x[y], sum_c w_c x_c for label smoothing); backward reads it
once more and writes the gradient from the saved lse, with grad_output folded in. Same contract and
formulas as csrc/cross_entropy.cpp:
  L       = (1-eps) w_y (lse - x_y) + eps/C (W lse - sum_c w_c x_c) + z lse^2
  dL/dx_j = p_j A - eps/C w_j - (1-eps) w_y [j == y],   A = (1-eps) w_y + eps/C W + 2 z lse
Confident rows (csrc/rows.h): lse - x_y comes from log1p(S / e_y) (_common.row_stats), and the
target column is written after the sweep as -A q + eps/C (W - w_y) + 2 z lse, with
q = 1 - p_y = sum_{j != y} p_j summed during the sweep, never as p_y - 1.
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, device_guard, float_arg, row_block, row_setup, row_stats,
                      row_stats2d, rows_block, rows_setup, tl_acc)


@triton.jit
def _row_loss(nll, lse, swx, w_sum, w_y, C, label_smoothing, z_loss,
              HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """The loss of a row (or of rows, elementwise) from row_stats' results."""
    if not HAS_WEIGHT:
        w_sum = w_sum + C  # W = C without weights
    # Terms with a zero coefficient are dropped, not multiplied by 0: lse may be huge (inf * 0).
    loss = (1.0 - label_smoothing) * w_y * nll
    if HAS_SMOOTHING:
        loss += label_smoothing / C * (w_sum * lse - swx)
    loss += tl.where(z_loss != 0.0, z_loss * lse * lse, 0.0)
    return loss


@triton.jit
def _cross_entropy_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd, D, TARGET, WEIGHT, LOSS, LSE,
    C, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    label_smoothing = float_arg(label_smoothing, ACC)
    z_loss = float_arg(z_loss, ACC)
    row, x_row, y, valid = row_setup(X, stride_xn, stride_xd, D, TARGET, C, ignore_index)
    lse, nll, q, swx, w_sum = row_stats(x_row, stride_xc, C, y, valid, WEIGHT, HAS_WEIGHT,
                                        HAS_SMOOTHING, ACC, BLOCK)
    w_y = tl.load(WEIGHT + y).to(ACC) if HAS_WEIGHT else 1.0
    loss = _row_loss(nll, lse, swx, w_sum, w_y, C, label_smoothing, z_loss, HAS_WEIGHT,
                     HAS_SMOOTHING)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, tl.where(valid, lse, 0.0))


@triton.jit
def _cross_entropy_fwd_rows_kernel(
    X, stride_xn, stride_xc, stride_xd, D, TARGET, WEIGHT, LOSS, LSE,
    n_rows, C, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """_cross_entropy_fwd_kernel for ROWS whole rows (C <= BLOCK) per program."""
    label_smoothing = float_arg(label_smoothing, ACC)
    z_loss = float_arg(z_loss, ACC)
    rows, x_rows, y, valid, live = rows_setup(X, stride_xn, stride_xd, D, TARGET, C, ignore_index,
                                              n_rows, ROWS)
    lse, nll, q, swx, w_sum = row_stats2d(x_rows, stride_xc, C, y, valid, WEIGHT, HAS_WEIGHT,
                                          HAS_SMOOTHING, ACC, BLOCK)
    w_y = tl.load(WEIGHT + y).to(ACC) if HAS_WEIGHT else 1.0
    loss = _row_loss(nll, lse, swx, w_sum, w_y, C, label_smoothing, z_loss, HAS_WEIGHT,
                     HAS_SMOOTHING)
    tl.store(LOSS + rows, tl.where(valid, loss, 0.0), mask=live)
    tl.store(LSE + rows, tl.where(valid, lse, 0.0), mask=live)


@triton.jit
def _cross_entropy_bwd_kernel(
    X, stride_xn, stride_xc, stride_xd, D, TARGET, WEIGHT, LSE, GRAD_SCALE, W_SUM,
    G, stride_gn, stride_gc, stride_gd,
    C, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    label_smoothing = float_arg(label_smoothing, ACC)
    z_loss = float_arg(z_loss, ACC)
    row, x_row, y, valid = row_setup(X, stride_xn, stride_xd, D, TARGET, C, ignore_index)
    w_y = tl.load(WEIGHT + y).to(ACC) if HAS_WEIGHT else 1.0
    k = label_smoothing / C
    w_sum = tl.load(W_SUM).to(ACC) if HAS_WEIGHT else tl.zeros((), ACC) + C
    lse = tl.load(LSE + row).to(ACC)
    scale = tl.load(GRAD_SCALE + row).to(ACC) if PER_ROW_SCALE else tl.load(GRAD_SCALE).to(ACC)
    a = (1.0 - label_smoothing) * w_y + k * w_sum + 2.0 * z_loss * lse
    c_read = tl.where(valid, C, 0)
    g_row = G + (row // D) * stride_gn + (row % D) * stride_gd
    q = tl.zeros((), ACC)  # 1 - p_y = sum_{j != y} p_j, summed as the row is swept
    for off in range(0, C, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=cols < c_read, other=0.0).to(ACC)
        p = tl.where((cols < c_read) & (cols != y), tl.exp(x - lse), 0.0)
        q += tl.sum(p, 0)
        g = p * a  # the target column is written after the sweep, from q
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= k * tl.load(WEIGHT + cols.to(tl.int64), mask=cols < C, other=0.0).to(ACC)
            else:
                g -= k
        g = tl.where(valid, g * scale, 0.0)
        tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(G.dtype.element_ty), mask=cols < C)
    # p_y a - k w_y - (1-eps) w_y = -a (1 - p_y) + k (W - w_y) + 2 z lse, with 1 - p_y = q.
    g_y = (-a * q + k * (w_sum - w_y) + 2.0 * z_loss * lse) * scale
    tl.store(g_row + y * stride_gc, g_y.to(G.dtype.element_ty), mask=valid)


@triton.jit
def _cross_entropy_bwd_rows_kernel(
    X, stride_xn, stride_xc, stride_xd, D, TARGET, WEIGHT, LSE, GRAD_SCALE, W_SUM,
    G, stride_gn, stride_gc, stride_gd,
    n_rows, C, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """_cross_entropy_bwd_kernel for ROWS whole rows (C <= BLOCK) per program: the tile is read
    whole before anything is stored (in place is safe); the target column, from q summed over
    the others, goes out in the same store."""
    label_smoothing = float_arg(label_smoothing, ACC)
    z_loss = float_arg(z_loss, ACC)
    rows, x_rows, y, valid, live = rows_setup(X, stride_xn, stride_xd, D, TARGET, C, ignore_index,
                                              n_rows, ROWS)
    w_y = tl.load(WEIGHT + y).to(ACC) if HAS_WEIGHT else 1.0
    k = label_smoothing / C
    w_sum = tl.load(W_SUM).to(ACC) if HAS_WEIGHT else tl.zeros((), ACC) + C
    lse = tl.load(LSE + rows, mask=live, other=0.0).to(ACC)
    if PER_ROW_SCALE:
        scale = tl.load(GRAD_SCALE + rows, mask=live, other=0.0).to(ACC)
    else:
        scale = tl.load(GRAD_SCALE).to(ACC)
    a = (1.0 - label_smoothing) * w_y + k * w_sum + 2.0 * z_loss * lse
    cols = tl.arange(0, BLOCK)
    inrow = valid[:, None] & (cols < C)[None, :]
    x = tl.load(x_rows[:, None] + (cols.to(tl.int64) * stride_xc)[None, :], mask=inrow,
                other=0.0).to(ACC)
    is_y = cols[None, :] == y[:, None]
    p = tl.where(inrow & ~is_y, tl.exp(x - lse[:, None]), 0.0)
    q = tl.sum(p, 1)  # 1 - p_y = sum_{j != y} p_j
    g = p * a[:, None]
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            g -= k * tl.load(WEIGHT + cols.to(tl.int64), mask=cols < C, other=0.0).to(ACC)[None, :]
        else:
            g -= k
    # p_y a - k w_y - (1-eps) w_y = -a (1 - p_y) + k (W - w_y) + 2 z lse, with 1 - p_y = q.
    g_y = -a * q + k * (w_sum - w_y) + 2.0 * z_loss * lse
    g = tl.where(is_y, g_y[:, None], g)
    if PER_ROW_SCALE:
        g = g * scale[:, None]
    else:
        g = g * scale
    g = tl.where(valid[:, None], g, 0.0)
    g_rows = G + (rows // D) * stride_gn + (rows % D) * stride_gd
    tl.store(g_rows[:, None] + (cols.to(tl.int64) * stride_gc)[None, :],
             g.to(G.dtype.element_ty), mask=live[:, None] & (cols < C)[None, :])


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss):
    """Per-row (loss, lse) in the acc dtype for logits [N, C, D] and target [N*D] int64."""
    N, C, D = logits.shape
    rows = N * D
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    if rows == 0:
        return loss, lse
    tiles = rows_block(C, rows)
    with device_guard(logits):
        if tiles is not None:
            n_per, block, num_warps = tiles
            _cross_entropy_fwd_rows_kernel[(triton.cdiv(rows, n_per),)](
                logits, *logits.stride(), D, target, weight if weight is not None else loss,
                loss, lse, rows, C, ignore_index, float(label_smoothing), float(z_loss),
                HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0,
                ACC=tl_acc(logits.dtype), ROWS=n_per, BLOCK=block, num_warps=num_warps,
            )
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
    rows = N * D
    if rows == 0:
        return grad
    tiles = rows_block(C, rows)
    with device_guard(logits):
        w_sum = weight.sum() if weight is not None else lse  # a device scalar: no host sync
        if tiles is not None:
            n_per, block, num_warps = tiles
            _cross_entropy_bwd_rows_kernel[(triton.cdiv(rows, n_per),)](
                logits, *logits.stride(), D, target, weight if weight is not None else lse, lse,
                grad_scale, w_sum, grad, *grad.stride(),
                rows, C, ignore_index, float(label_smoothing), float(z_loss),
                HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0,
                PER_ROW_SCALE=grad_scale.numel() != 1, ACC=tl_acc(logits.dtype), ROWS=n_per,
                BLOCK=block, num_warps=num_warps,
            )
            return grad
        block, num_warps = row_block(C)
        _cross_entropy_bwd_kernel[(rows,)](
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
