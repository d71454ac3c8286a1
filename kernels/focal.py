"""Focal losses: sigmoid (element-wise, one program per CHUNK elements) and softmax (one program
per row, or several whole rows per program for C <= _common.ROWS_MAX_C, or for (N, C, d1..dk)
inputs with contiguous pixels BLOCK_D pixels of one image per program, as cross-entropy's tiles
and csrc/focal.cpp's softmax_focal_tiles). Same contracts and formulas as csrc/focal.cpp.

Sigmoid, with e = exp(-|x|), u = 1-y (x >= 0) or y (x < 0), v = 1 - u, s = sign(x):
  ce = |x| u + log1p(e),  q = 1 - p_t = (u + v e)/(1 + e),  L = alpha_t ce q^gamma
  dL/dx = alpha_t q^gamma s [ (u - v e)/(1 + e) + gamma (u - v) r ce ],
  r = p(1-p)/q = e/((1+e)(u+v e))
  (r in [0, 1], limit 1 at q = 0), which is gamma q^(gamma-1) dq/dx without forming q^(gamma-1).
Softmax, lp = log p_t, q = 1 - p_t (both from kernels/_common.row_stats, no cancellation on
confident rows), L = -alpha_t q^gamma lp:
  dL/dx_j = A (p_j - [j == t]),  A = alpha_t q^gamma (1 - gamma p_t lp/q),  lp/q -> -1 as q -> 0
  (written A p_j off the target and -A q on it, as cross-entropy does).
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, device_guard, float_arg, log1p, row_block, row_setup,
                      row_stats, row_stats2d, rows_block, rows_setup, tile_block, tile_setup,
                      tile_stats, tl_acc, use_tiles)

# Elements per partial sum of the reduced sigmoid loss (kChunk in csrc/focal.cpp).
CHUNK = 4096


# How q^gamma is formed (GAMMA_MODE, as csrc/focal.cpp's kPow / kZero / kSquare).
POW, ZERO, SQUARE = 0, 1, 2


def gamma_mode(gamma: float) -> int:
    """SQUARE for the common gamma = 2 (q * q, no log/exp per element), ZERO for gamma = 0."""
    return SQUARE if gamma == 2.0 else (ZERO if gamma == 0.0 else POW)


@triton.jit
def _pow_gamma(q, gamma, GAMMA_MODE: tl.constexpr):
    """q^gamma for q in [0, 1], gamma >= 0, with 0^0 = 1 (and no 0 * log(0) formed)."""
    if GAMMA_MODE == 2:
        return q * q
    if GAMMA_MODE == 1:
        return tl.full(q.shape, 1.0, q.dtype)
    pos = q > 0
    at_zero = tl.where(gamma == 0.0, 1.0, 0.0)
    return tl.where(pos, tl.exp(gamma * tl.log(tl.where(pos, q, 1.0))), at_zero)


@triton.jit
def _sigmoid_focal_fwd_kernel(
    X, Y, GRAD_SCALE, LOSS, G, n, alpha: tl.float64, gamma: tl.float64,
    HAS_ALPHA: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, REDUCE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, GAMMA_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    alpha = float_arg(alpha, ACC)
    gamma = float_arg(gamma, ACC)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
    a = tl.abs(x)
    e = tl.exp(-a)
    ope = 1.0 + e
    pos = x >= 0
    u = tl.where(pos, 1.0 - y, y)
    v = tl.where(pos, y, 1.0 - y)
    d = u + v * e
    qg = _pow_gamma(d / ope, gamma, GAMMA_MODE)
    ce = a * u + log1p(e)
    if HAS_ALPHA:
        at = alpha * y + (1.0 - alpha) * (1.0 - y)
    else:
        at = tl.full((BLOCK,), 1.0, ACC)
    loss = tl.where(mask, at * ce * qg, 0.0)
    if REDUCE:
        tl.store(LOSS + pid, tl.sum(loss, 0))
    else:
        tl.store(LOSS + offs, loss, mask=mask)
    if COMPUTE_GRAD:
        scale = tl.load(GRAD_SCALE).to(ACC) if HAS_GRAD_SCALE else 1.0
        r = tl.where(d > 0, e / (ope * tl.where(d > 0, d, 1.0)), 1.0)
        b = (u - v * e) / ope + gamma * (u - v) * r * ce
        g = scale * at * qg * tl.where(pos, b, -b)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)


def sigmoid_focal_fwd(input, target, grad_scale, alpha, gamma, reduce, compute_grad):
    """Launch on contiguous input/target of one shape and dtype; same contract as the C++ op."""
    n = input.numel()
    acc = acc_dtype(input.dtype)
    chunks = triton.cdiv(n, CHUNK)
    if reduce:
        loss = torch.empty(chunks, dtype=acc, device=input.device)
    else:
        loss = torch.empty(input.shape, dtype=acc, device=input.device)
    grad = torch.empty_like(input) if compute_grad else input.new_empty(0)
    if n == 0:
        return loss, grad
    with device_guard(input):
        _sigmoid_focal_fwd_kernel[(chunks,)](
            input, target, grad_scale if grad_scale is not None else loss, loss,
            grad if compute_grad else input, n, float(alpha), float(gamma),
            HAS_ALPHA=alpha >= 0, HAS_GRAD_SCALE=grad_scale is not None, REDUCE=reduce,
            COMPUTE_GRAD=compute_grad, GAMMA_MODE=gamma_mode(gamma), ACC=tl_acc(input.dtype),
            BLOCK=CHUNK, num_warps=8,
        )
    return loss, grad


@triton.jit
def _focal_row(lse, nll, q, valid, t_safe, ALPHA, gamma, HAS_ALPHA: tl.constexpr,
               GAMMA_MODE: tl.constexpr, ACC: tl.constexpr):
    """Softmax focal terms of a row (or of rows / pixels, elementwise) from row_stats' results:
    lse (0 on ignored rows: keeps exp(x - lse) finite), log p_t, alpha_t and q^gamma."""
    a_t = tl.load(ALPHA + t_safe).to(ACC) if HAS_ALPHA else 1.0
    return tl.where(valid, lse, 0.0), -nll, a_t, _pow_gamma(q, gamma, GAMMA_MODE)


@triton.jit
def _focal_grad_a(lp, q, qg, a_t, gamma, valid, GRAD_SCALE, HAS_GRAD_SCALE: tl.constexpr,
                  ACC: tl.constexpr):
    """A = scale alpha_t q^gamma (1 - gamma p_t lp/q) (csrc/focal.cpp), 0 on ignored rows: the
    gradient is A p_j off the target and -A q on it."""
    scale = tl.load(GRAD_SCALE).to(ACC) if HAS_GRAD_SCALE else 1.0
    ratio = tl.where(q > 0, lp / tl.where(q > 0, q, 1.0), -1.0)  # log(1-q)/q -> -1 as q -> 0
    return tl.where(valid, scale * a_t * qg * (1.0 - gamma * tl.exp(lp) * ratio), 0.0)


@triton.jit
def _softmax_focal_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd, D,
    TARGET, ALPHA, GRAD_SCALE, LOSS,
    G, stride_gn, stride_gc, stride_gd,
    C, ignore_index, gamma: tl.float64,
    HAS_ALPHA: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    GAMMA_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    gamma = float_arg(gamma, ACC)
    row, x_row, t_safe, valid = row_setup(X, stride_xn, stride_xd, D, TARGET, C, ignore_index)
    lse, nll, q, _, _ = row_stats(x_row, stride_xc, C, t_safe, valid, ALPHA, False, False, ACC,
                                  BLOCK)
    lse, lp, a_t, qg = _focal_row(lse, nll, q, valid, t_safe, ALPHA, gamma, HAS_ALPHA,
                                  GAMMA_MODE, ACC)
    tl.store(LOSS + row, tl.where(valid, -a_t * qg * lp, 0.0))

    if COMPUTE_GRAD:
        a = _focal_grad_a(lp, q, qg, a_t, gamma, valid, GRAD_SCALE, HAS_GRAD_SCALE, ACC)
        g_row = G + (row // D) * stride_gn + (row % D) * stride_gd
        c_read = tl.where(valid, C, 0)  # columns to read: none for ignored rows
        for off in range(0, C, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=cols < c_read,
                        other=0.0).to(ACC)
            g = tl.where(cols == t_safe, -a * q, a * tl.exp(x - lse))
            tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(G.dtype.element_ty), mask=cols < C)


@triton.jit
def _softmax_focal_fwd_rows_kernel(
    X, stride_xn, stride_xc, stride_xd, D,
    TARGET, ALPHA, GRAD_SCALE, LOSS,
    G, stride_gn, stride_gc, stride_gd,
    n_rows, C, ignore_index, gamma: tl.float64,
    HAS_ALPHA: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    GAMMA_MODE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """_softmax_focal_fwd_kernel for ROWS whole rows (C <= BLOCK) per program."""
    gamma = float_arg(gamma, ACC)
    rows, x_rows, t_safe, valid, live = rows_setup(X, stride_xn, stride_xd, D, TARGET, C,
                                                   ignore_index, n_rows, ROWS)
    lse, nll, q, _, _ = row_stats2d(x_rows, stride_xc, C, t_safe, valid, ALPHA, False, False,
                                    ACC, BLOCK)
    lse, lp, a_t, qg = _focal_row(lse, nll, q, valid, t_safe, ALPHA, gamma, HAS_ALPHA,
                                  GAMMA_MODE, ACC)
    tl.store(LOSS + rows, tl.where(valid, -a_t * qg * lp, 0.0), mask=live)

    if COMPUTE_GRAD:
        a = _focal_grad_a(lp, q, qg, a_t, gamma, valid, GRAD_SCALE, HAS_GRAD_SCALE, ACC)
        cols = tl.arange(0, BLOCK)
        inrow = valid[:, None] & (cols < C)[None, :]
        # The tile again (row_stats2d's read is still in L1/L2).
        x = tl.load(x_rows[:, None] + (cols.to(tl.int64) * stride_xc)[None, :], mask=inrow,
                    other=0.0).to(ACC)
        g = tl.where(cols[None, :] == t_safe[:, None], (-a * q)[:, None],
                     a[:, None] * tl.exp(x - lse[:, None]))
        g_rows = G + (rows // D) * stride_gn + (rows % D) * stride_gd
        tl.store(g_rows[:, None] + (cols.to(tl.int64) * stride_gc)[None, :],
                 g.to(G.dtype.element_ty), mask=live[:, None] & (cols < C)[None, :])


@triton.jit
def _softmax_focal_fwd_tile_kernel(
    X, stride_xn, stride_xc, D,
    TARGET, ALPHA, GRAD_SCALE, LOSS,
    G, stride_gn, stride_gc,
    C, ignore_index, gamma: tl.float64,
    HAS_ALPHA: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    GAMMA_MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """_softmax_focal_fwd_kernel for BLOCK_D contiguous pixels of one image per program (X and G
    [N, C, D] with pixels one element apart), the classes swept BLOCK_C at a time."""
    gamma = float_arg(gamma, ACC)
    rows, n, d, t_safe, valid, live = tile_setup(TARGET, D, C, ignore_index, BLOCK_D)
    x_px = X + n * stride_xn + d
    lse, nll, q, _, _ = tile_stats(x_px, stride_xc, C, t_safe, valid, ALPHA, False, False, ACC,
                                   BLOCK_C)
    lse, lp, a_t, qg = _focal_row(lse, nll, q, valid, t_safe, ALPHA, gamma, HAS_ALPHA,
                                  GAMMA_MODE, ACC)
    tl.store(LOSS + rows, tl.where(valid, -a_t * qg * lp, 0.0), mask=live)

    if COMPUTE_GRAD:
        a = _focal_grad_a(lp, q, qg, a_t, gamma, valid, GRAD_SCALE, HAS_GRAD_SCALE, ACC)
        g_px = G + n * stride_gn + d
        for off in range(0, C, BLOCK_C):  # the tile again, just read: in L1/L2
            cls = off + tl.arange(0, BLOCK_C)
            x = tl.load(x_px[None, :] + (cls.to(tl.int64) * stride_xc)[:, None],
                        mask=(cls < C)[:, None] & valid[None, :], other=0.0).to(ACC)
            g = tl.where(cls[:, None] == t_safe[None, :], (-a * q)[None, :],
                         a[None, :] * tl.exp(x - lse[None, :]))
            tl.store(g_px[None, :] + (cls.to(tl.int64) * stride_gc)[:, None],
                     g.to(G.dtype.element_ty), mask=(cls < C)[:, None] & live[None, :])


def softmax_focal_fwd(logits, target, alpha, grad_scale, ignore_index, gamma, compute_grad):
    """Launch on logits [N, C, D] and target [N*D] int64; same contract as the C++ op."""
    N, C, D = logits.shape
    rows = N * D
    loss = torch.empty(rows, dtype=acc_dtype(logits.dtype), device=logits.device)
    grad = (torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if compute_grad
            else logits.new_empty(0))
    if rows == 0:
        return loss, grad
    g = grad if compute_grad else logits
    tiles = rows_block(C, rows)
    with device_guard(logits):
        if use_tiles(logits, g):
            block_c, block_d, num_warps = tile_block(C, D)
            _softmax_focal_fwd_tile_kernel[(N * triton.cdiv(D, block_d),)](
                logits, logits.stride(0), logits.stride(1), D,
                target, alpha if alpha is not None else loss,
                grad_scale if grad_scale is not None else loss, loss,
                g, g.stride(0), g.stride(1),
                C, ignore_index, float(gamma),
                HAS_ALPHA=alpha is not None, HAS_GRAD_SCALE=grad_scale is not None,
                COMPUTE_GRAD=compute_grad, GAMMA_MODE=gamma_mode(gamma),
                ACC=tl_acc(logits.dtype), BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps,
            )
            return loss, grad
        if tiles is not None:
            n_per, block, num_warps = tiles
            _softmax_focal_fwd_rows_kernel[(triton.cdiv(rows, n_per),)](
                logits, *logits.stride(), D,
                target, alpha if alpha is not None else loss,
                grad_scale if grad_scale is not None else loss, loss,
                g, *g.stride(),
                rows, C, ignore_index, float(gamma),
                HAS_ALPHA=alpha is not None, HAS_GRAD_SCALE=grad_scale is not None,
                COMPUTE_GRAD=compute_grad, GAMMA_MODE=gamma_mode(gamma),
                ACC=tl_acc(logits.dtype), ROWS=n_per, BLOCK=block, num_warps=num_warps,
            )
            return loss, grad
        block, num_warps = row_block(C)
        _softmax_focal_fwd_kernel[(rows,)](
            logits, *logits.stride(), D,
            target, alpha if alpha is not None else loss,
            grad_scale if grad_scale is not None else loss, loss,
            g, *g.stride(),
            C, ignore_index, float(gamma),
            HAS_ALPHA=alpha is not None, HAS_GRAD_SCALE=grad_scale is not None,
            COMPUTE_GRAD=compute_grad, GAMMA_MODE=gamma_mode(gamma), ACC=tl_acc(logits.dtype),
            BLOCK=block, num_warps=num_warps,
        )
    return loss, grad
