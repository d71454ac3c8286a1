"""Softmax cross-entropy over class-index targets: one program per row.

Pass 1 reads the row once (online lse, x[y], sum_c w_c x_c for label smoothing); pass 2, when a
gradient is needed, writes it. Same contract and formulas as csrc/cross_entropy.cpp:
  L    = (1-eps) w_y (lse - x_y) + eps/C (W lse - sum_c w_c x_c) + z lse^2
  dL/dx_j = p_j A - eps/C w_j - (1-eps) w_y [j == y],   A = (1-eps) w_y + eps/C W + 2 z lse
with the target column written as A expm1(x_y - lse) + eps/C (W - w_y) + 2 z lse (no p_y - 1).
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, expm1, online_lse_step, row_block, tl_acc


@triton.jit
def _cross_entropy_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd, D,
    TARGET, WEIGHT, GRAD_SCALE, LOSS, LSE,
    G, stride_gn, stride_gc, stride_gd,
    C, ignore_index, label_smoothing, z_loss,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // D
    d = row - n * D
    x_row = X + n * stride_xn + d * stride_xd
    y = tl.load(TARGET + row)
    # Out-of-range targets are reported on the host (eager) before launch; here they only must
    # not read out of bounds, so they are treated like ignored rows.
    valid = (y != ignore_index) & (y >= 0) & (y < C)
    y_safe = tl.where(valid, y, 0)
    k = label_smoothing / C
    c_read = tl.where(valid, C, 0)  # columns to read: none for ignored rows

    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    swx = tl.zeros((), ACC)
    w_sum = tl.zeros((), ACC)
    for off in range(0, C, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        cmask = cols < C
        x = tl.load(x_row + cols * stride_xc, mask=cols < c_read, other=0.0).to(ACC)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(WEIGHT + cols, mask=cmask, other=0.0).to(ACC)
                swx += tl.sum(w * x, 0)
                w_sum += tl.sum(w, 0)
            else:
                swx += tl.sum(x, 0)
        m, s = online_lse_step(m, s, tl.where(cmask, x, float("-inf")))
    lse = m + tl.log(s)
    if not HAS_WEIGHT:
        w_sum = w_sum + C  # W = sum_c w_c = C (only used with smoothing when weighted)
    x_y = tl.load(x_row + y_safe * stride_xc).to(ACC)
    w_y = tl.load(WEIGHT + y_safe).to(ACC) if HAS_WEIGHT else 1.0
    # Terms with a zero coefficient are dropped, not multiplied by 0: lse may be huge (inf * 0).
    loss = (1.0 - label_smoothing) * w_y * (lse - x_y)
    if HAS_SMOOTHING:
        loss += k * (w_sum * lse - swx)
    loss += tl.where(z_loss != 0.0, z_loss * lse * lse, 0.0)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(LSE + row, tl.where(valid, lse, 0.0))

    if COMPUTE_GRAD:
        scale = tl.load(GRAD_SCALE).to(ACC) if HAS_GRAD_SCALE else 1.0
        a = (1.0 - label_smoothing) * w_y + k * w_sum + 2.0 * z_loss * lse
        g_y = a * expm1(x_y - lse) + k * (w_sum - w_y) + 2.0 * z_loss * lse
        g_row = G + n * stride_gn + d * stride_gd
        for off in range(0, C, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            cmask = cols < C
            x = tl.load(x_row + cols * stride_xc, mask=cols < c_read, other=0.0).to(ACC)
            g = tl.exp(x - lse) * a
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    g -= k * tl.load(WEIGHT + cols, mask=cmask, other=0.0).to(ACC)
                else:
                    g -= k
            g = tl.where(cols == y_safe, g_y, g) * scale
            g = tl.where(valid, g, 0.0)
            tl.store(g_row + cols * stride_gc, g.to(G.dtype.element_ty), mask=cmask)


def cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                      compute_grad, grad=None):
    """Launch on logits [N, C, D] and target [N*D] int64; same contract as the C++ op.

    grad: where to write the gradient (the logits themselves for the in-place variant);
    allocated contiguous when None. Returns (loss, lse, grad) with loss/lse in the acc dtype.
    """
    N, C, D = logits.shape
    rows = N * D
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    if compute_grad and grad is None:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    elif not compute_grad:
        grad = logits.new_empty(0)
    if rows == 0:
        return loss, lse, grad
    g = grad if compute_grad else logits
    block, num_warps = row_block(C)
    _cross_entropy_fwd_kernel[(rows,)](
        logits, *logits.stride(), D,
        target, weight if weight is not None else loss,
        grad_scale if grad_scale is not None else loss, loss, lse,
        g, *g.stride(),
        C, ignore_index, float(label_smoothing), float(z_loss),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing != 0.0,
        HAS_GRAD_SCALE=grad_scale is not None, COMPUTE_GRAD=compute_grad,
        ACC=tl_acc(logits.dtype), BLOCK=block, num_warps=num_warps,
    )
    return loss, lse, grad
