"""Softmax cross-entropy over class-index targets: one program per row, or for C <= ROWS_MAX_C
several whole rows per program in a [ROWS, BLOCK] tile (_common.rows_block), or for (N, C, d1..dk)
inputs with contiguous pixels BLOCK_D pixels of one image per program, sweeping the classes in
[BLOCK_C, BLOCK_D] blocks (_common.tile_block: coalesced loads, where a row's classes are H*W apart).

Forward reads the row once (online lse, x[y], sum_c w_c x_c for label smoothing); backward reads it
once more and writes the gradient from the saved lse, with grad_output folded in. Same contract and
formulas as csrc/cross_entropy.cpp:
  L       = (1-eps) w_y (lse - x_y) + eps/C (W lse - sum_c w_c x_c) + z lse^2
  dL/dx_j = p_j A - eps/C w_j - (1-eps) w_y [j == y],   A = (1-eps) w_y + eps/C W + 2 z lse
Confident rows (csrc/rows.h): lse - x_y comes from log1p(S / e_y) (_common.row_stats), and the
target column is written after the sweep as -A q + eps/C (W - w_y) + 2 z lse, with
q = 1 - p_y = sum_{j != y} p_j summed during the sweep, never as p_y - 1.

With `grad` (the one-read scheme of inplace_backward on CUDA, see fusedloss/cross_entropy.py) the
forward kernels also write the gradient times a device scalar, in a second sweep right after the
row's statistics (q is known by then, so the target column goes out with the others). That sweep
re-reads what the program just read: one read from DRAM as long as the rows in flight fit in L2
(a 128k-vocabulary bf16 row is 256 KB; H100's L2 is 50 MB), to be checked on a GPU.
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, device_guard, float_arg, row_block, row_setup, row_stats,
                      row_stats2d, rows_block, rows_setup, tile_block, tile_setup, tile_stats,
                      tl_acc, use_tiles)


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
def _grad_a(w_y, W, lse, label_smoothing, k, z_loss):
    """A = (1-eps) w_y + k W + 2 z lse (k = eps/C): dL/dx_j = p_j A - k w_j off the target."""
    return (1.0 - label_smoothing) * w_y + k * W + 2.0 * z_loss * lse


@triton.jit
def _grad_y(a, q, w_y, W, lse, k, z_loss):
    """The target column: p_y A - k w_y - (1-eps) w_y = -A (1 - p_y) + k (W - w_y) + 2 z lse,
    with 1 - p_y = q summed over the other columns (never p_y - 1)."""
    return -a * q + k * (W - w_y) + 2.0 * z_loss * lse


@triton.jit
def _fwd_grad_terms(lse, q, valid, w_y, w_sum, C, label_smoothing, z_loss, GRAD_SCALE,
                    HAS_WEIGHT: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, ACC: tl.constexpr):
    """For a gradient written in forward, from row_stats' results: the off-target factor a, the
    target column g_y, k = eps/C, lse (0 on ignored rows) and grad_scale (1 if none)."""
    # W = sum_c w_c is only needed with smoothing (k = 0 otherwise), where row_stats summed it.
    W = w_sum if HAS_WEIGHT else w_sum + C
    k = label_smoothing / C
    lse = tl.where(valid, lse, 0.0)
    a = _grad_a(w_y, W, lse, label_smoothing, k, z_loss)
    g_y = _grad_y(a, q, w_y, W, lse, k, z_loss)
    scale = tl.load(GRAD_SCALE).to(ACC) if HAS_GRAD_SCALE else 1.0
    return a, g_y, k, lse, scale


@triton.jit
def _cross_entropy_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd, D, TARGET, WEIGHT, LOSS, LSE,
    GRAD_SCALE, G, stride_gn, stride_gc, stride_gd,
    C, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
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
    if COMPUTE_GRAD:
        a, g_y, k, lse, scale = _fwd_grad_terms(lse, q, valid, w_y, w_sum, C, label_smoothing,
                                                z_loss, GRAD_SCALE, HAS_WEIGHT, HAS_GRAD_SCALE,
                                                ACC)
        c_read = tl.where(valid, C, 0)
        g_row = G + (row // D) * stride_gn + (row % D) * stride_gd
        for off in range(0, C, BLOCK):  # the row again, just read: in L1/L2
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=cols < c_read,
                        other=0.0).to(ACC)
            g = a * tl.exp(x - lse)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    g -= k * tl.load(WEIGHT + cols.to(tl.int64), mask=cols < C, other=0.0).to(ACC)
                else:
                    g -= k
            g = tl.where(valid, tl.where(cols == y, g_y, g) * scale, 0.0)
            tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(G.dtype.element_ty),
                     mask=cols < C)


@triton.jit
def _cross_entropy_fwd_rows_kernel(
    X, stride_xn, stride_xc, stride_xd, D, TARGET, WEIGHT, LOSS, LSE,
    GRAD_SCALE, G, stride_gn, stride_gc, stride_gd,
    n_rows, C, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
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
    if COMPUTE_GRAD:
        a, g_y, k, lse, scale = _fwd_grad_terms(lse, q, valid, w_y, w_sum, C, label_smoothing,
                                                z_loss, GRAD_SCALE, HAS_WEIGHT, HAS_GRAD_SCALE,
                                                ACC)
        cols = tl.arange(0, BLOCK)
        inrow = valid[:, None] & (cols < C)[None, :]
        # The tile again (row_stats2d's read is still in L1/L2).
        x = tl.load(x_rows[:, None] + (cols.to(tl.int64) * stride_xc)[None, :], mask=inrow,
                    other=0.0).to(ACC)
        g = a[:, None] * tl.exp(x - lse[:, None])
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= k * tl.load(WEIGHT + cols.to(tl.int64), mask=cols < C,
                                 other=0.0).to(ACC)[None, :]
            else:
                g -= k
        g = tl.where(cols[None, :] == y[:, None], g_y[:, None], g)
        g = tl.where(valid[:, None], g * scale, 0.0)
        g_rows = G + (rows // D) * stride_gn + (rows % D) * stride_gd
        tl.store(g_rows[:, None] + (cols.to(tl.int64) * stride_gc)[None, :],
                 g.to(G.dtype.element_ty), mask=live[:, None] & (cols < C)[None, :])


@triton.jit
def _cross_entropy_fwd_tile_kernel(
    X, stride_xn, stride_xc, D, TARGET, WEIGHT, LOSS, LSE,
    GRAD_SCALE, G, stride_gn, stride_gc,
    C, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """_cross_entropy_fwd_kernel for BLOCK_D contiguous pixels of one image per program (X and G
    [N, C, D] with pixels one element apart), the classes swept BLOCK_C at a time."""
    label_smoothing = float_arg(label_smoothing, ACC)
    z_loss = float_arg(z_loss, ACC)
    rows, n, d, y, valid, live = tile_setup(TARGET, D, C, ignore_index, BLOCK_D)
    x_px = X + n * stride_xn + d
    lse, nll, q, swx, w_sum = tile_stats(x_px, stride_xc, C, y, valid, WEIGHT, HAS_WEIGHT,
                                         HAS_SMOOTHING, ACC, BLOCK_C)
    w_y = tl.load(WEIGHT + y).to(ACC) if HAS_WEIGHT else 1.0
    loss = _row_loss(nll, lse, swx, w_sum, w_y, C, label_smoothing, z_loss, HAS_WEIGHT,
                     HAS_SMOOTHING)
    tl.store(LOSS + rows, tl.where(valid, loss, 0.0), mask=live)
    tl.store(LSE + rows, tl.where(valid, lse, 0.0), mask=live)
    if COMPUTE_GRAD:
        a, g_y, k, lse, scale = _fwd_grad_terms(lse, q, valid, w_y, w_sum, C, label_smoothing,
                                                z_loss, GRAD_SCALE, HAS_WEIGHT, HAS_GRAD_SCALE,
                                                ACC)
        g_px = G + n * stride_gn + d
        for off in range(0, C, BLOCK_C):  # the tile again, just read: in L1/L2
            cls = off + tl.arange(0, BLOCK_C)
            inb = (cls < C)[:, None] & valid[None, :]
            x = tl.load(x_px[None, :] + (cls.to(tl.int64) * stride_xc)[:, None], mask=inb,
                        other=0.0).to(ACC)
            g = a[None, :] * tl.exp(x - lse[None, :])
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    g -= k * tl.load(WEIGHT + cls.to(tl.int64), mask=cls < C,
                                     other=0.0).to(ACC)[:, None]
                else:
                    g -= k
            g = tl.where(cls[:, None] == y[None, :], g_y[None, :], g)
            g = tl.where(valid[None, :], g * scale, 0.0)
            tl.store(g_px[None, :] + (cls.to(tl.int64) * stride_gc)[:, None],
                     g.to(G.dtype.element_ty), mask=(cls < C)[:, None] & live[None, :])


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
    a = _grad_a(w_y, w_sum, lse, label_smoothing, k, z_loss)
    c_read = tl.where(valid, C, 0)
    y_store = tl.where(valid, y, -1)  # the column the sweep leaves out (none if invalid)
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
        # The target column is left to the store after the sweep (one store per address: two
        # stores from different warps would race).
        tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(G.dtype.element_ty),
                 mask=(cols < C) & (cols != y_store))
    g_y = _grad_y(a, q, w_y, w_sum, lse, k, z_loss) * scale
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
    a = _grad_a(w_y, w_sum, lse, label_smoothing, k, z_loss)
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
    g_y = _grad_y(a, q, w_y, w_sum, lse, k, z_loss)
    g = tl.where(is_y, g_y[:, None], g)
    if PER_ROW_SCALE:
        g = g * scale[:, None]
    else:
        g = g * scale
    g = tl.where(valid[:, None], g, 0.0)
    g_rows = G + (rows // D) * stride_gn + (rows % D) * stride_gd
    tl.store(g_rows[:, None] + (cols.to(tl.int64) * stride_gc)[None, :],
             g.to(G.dtype.element_ty), mask=live[:, None] & (cols < C)[None, :])


@triton.jit
def _cross_entropy_bwd_tile_kernel(
    X, stride_xn, stride_xc, D, TARGET, WEIGHT, LSE, GRAD_SCALE, W_SUM,
    G, stride_gn, stride_gc,
    C, ignore_index, label_smoothing: tl.float64, z_loss: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PER_ROW_SCALE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """_cross_entropy_bwd_kernel for BLOCK_D contiguous pixels of one image per program: the
    classes are swept in [BLOCK_C, BLOCK_D] blocks, each read before it is written (in place is
    safe); the target column goes out after the sweep, from q."""
    label_smoothing = float_arg(label_smoothing, ACC)
    z_loss = float_arg(z_loss, ACC)
    rows, n, d, y, valid, live = tile_setup(TARGET, D, C, ignore_index, BLOCK_D)
    w_y = tl.load(WEIGHT + y).to(ACC) if HAS_WEIGHT else 1.0
    k = label_smoothing / C
    w_sum = tl.load(W_SUM).to(ACC) if HAS_WEIGHT else tl.zeros((), ACC) + C
    lse = tl.load(LSE + rows, mask=live, other=0.0).to(ACC)
    if PER_ROW_SCALE:
        scale = tl.load(GRAD_SCALE + rows, mask=live, other=0.0).to(ACC)
    else:
        scale = tl.zeros_like(lse) + tl.load(GRAD_SCALE).to(ACC)
    a = _grad_a(w_y, w_sum, lse, label_smoothing, k, z_loss)
    x_px = X + n * stride_xn + d
    g_px = G + n * stride_gn + d
    q = tl.zeros_like(lse)  # 1 - p_y = sum_{j != y} p_j per pixel, summed during the sweep
    for off in range(0, C, BLOCK_C):
        cls = off + tl.arange(0, BLOCK_C)
        inb = (cls < C)[:, None] & valid[None, :]
        x = tl.load(x_px[None, :] + (cls.to(tl.int64) * stride_xc)[:, None], mask=inb,
                    other=0.0).to(ACC)
        is_y = cls[:, None] == y[None, :]
        p = tl.where(inb & ~is_y, tl.exp(x - lse[None, :]), 0.0)
        q += tl.sum(p, 0)
        g = p * a[None, :]
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= k * tl.load(WEIGHT + cls.to(tl.int64), mask=cls < C,
                                 other=0.0).to(ACC)[:, None]
            else:
                g -= k
        g = tl.where(valid[None, :], g * scale[None, :], 0.0)
        tl.store(g_px[None, :] + (cls.to(tl.int64) * stride_gc)[:, None],
                 g.to(G.dtype.element_ty),
                 mask=(cls < C)[:, None] & live[None, :] & ~(is_y & valid[None, :]))
    g_y = _grad_y(a, q, w_y, w_sum, lse, k, z_loss) * scale
    tl.store(g_px + y * stride_gc, g_y.to(G.dtype.element_ty), mask=valid)


@triton.jit
def _scale_kernel(G, SCALE, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """G *= SCALE (a device scalar) over n contiguous elements, skipped on the device when SCALE
    is 1: the one-read scheme's backward (see fusedloss/cross_entropy.py) costs no pass over
    the gradient for the usual loss.backward(), and no host sync to find that out."""
    s = tl.load(SCALE).to(ACC)
    if s != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
        tl.store(G + offs, (g * s).to(G.dtype.element_ty), mask=mask)


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss,
                      grad_scale=None, grad=None):
    """Per-row (loss, lse) in the acc dtype for logits [N, C, D] and target [N*D] int64.

    With `grad` ([N, C, D], possibly the logits themselves) the gradient of the summed per-row
    loss times grad_scale (a device scalar; None: 1) is written there in the same pass."""
    N, C, D = logits.shape
    rows = N * D
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    if rows == 0:
        return loss, lse
    compute_grad = grad is not None
    g = grad if compute_grad else logits
    flags = dict(HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0,
                 COMPUTE_GRAD=compute_grad, HAS_GRAD_SCALE=grad_scale is not None,
                 ACC=tl_acc(logits.dtype))
    w = weight if weight is not None else loss
    gs = grad_scale if grad_scale is not None else loss
    opts = (C, ignore_index, float(label_smoothing), float(z_loss))
    with device_guard(logits):
        if use_tiles(logits, g):
            block_c, block_d, num_warps = tile_block(C, D)
            _cross_entropy_fwd_tile_kernel[(N * triton.cdiv(D, block_d),)](
                logits, logits.stride(0), logits.stride(1), D, target, w, loss, lse,
                gs, g, g.stride(0), g.stride(1), *opts,
                **flags, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps,
            )
            return loss, lse
        tiles = rows_block(C, rows)
        if tiles is not None:
            n_per, block, num_warps = tiles
            _cross_entropy_fwd_rows_kernel[(triton.cdiv(rows, n_per),)](
                logits, *logits.stride(), D, target, w, loss, lse, gs, g, *g.stride(),
                rows, *opts, **flags, ROWS=n_per, BLOCK=block, num_warps=num_warps,
            )
            return loss, lse
        block, num_warps = row_block(C)
        _cross_entropy_fwd_kernel[(rows,)](
            logits, *logits.stride(), D, target, w, loss, lse, gs, g, *g.stride(),
            *opts, **flags, BLOCK=block, num_warps=num_warps,
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
    flags = dict(HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0,
                 PER_ROW_SCALE=grad_scale.numel() != 1, ACC=tl_acc(logits.dtype))
    opts = (C, ignore_index, float(label_smoothing), float(z_loss))
    w = weight if weight is not None else lse
    with device_guard(logits):
        w_sum = weight.sum() if weight is not None else lse  # a device scalar: no host sync
        if use_tiles(logits, grad):
            block_c, block_d, num_warps = tile_block(C, D)
            _cross_entropy_bwd_tile_kernel[(N * triton.cdiv(D, block_d),)](
                logits, logits.stride(0), logits.stride(1), D, target, w, lse, grad_scale,
                w_sum, grad, grad.stride(0), grad.stride(1), *opts,
                **flags, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps,
            )
            return grad
        tiles = rows_block(C, rows)
        if tiles is not None:
            n_per, block, num_warps = tiles
            _cross_entropy_bwd_rows_kernel[(triton.cdiv(rows, n_per),)](
                logits, *logits.stride(), D, target, w, lse, grad_scale, w_sum, grad,
                *grad.stride(), rows, *opts, **flags, ROWS=n_per, BLOCK=block,
                num_warps=num_warps,
            )
            return grad
        block, num_warps = row_block(C)
        _cross_entropy_bwd_kernel[(rows,)](
            logits, *logits.stride(), D, target, w, lse, grad_scale, w_sum, grad,
            *grad.stride(), *opts, **flags, BLOCK=block, num_warps=num_warps,
        )
    return grad


def cross_entropy_bwd_inplace(grad_scale, logits, target, lse, weight, ignore_index,
                              label_smoothing, z_loss):
    cross_entropy_bwd(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing,
                      z_loss, grad=logits)


# Elements per program of scale_inplace.
SCALE_BLOCK = 4096


def scale_inplace(grad, scale):
    """grad *= scale (a one-element device tensor) for a contiguous grad, in place; a no-op on
    the device when scale is 1 (no host read of its value)."""
    n = grad.numel()
    if n == 0:
        return grad
    with device_guard(grad):
        _scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](
            grad, scale, n, ACC=tl_acc(grad.dtype), BLOCK=SCALE_BLOCK, num_warps=8)
    return grad
