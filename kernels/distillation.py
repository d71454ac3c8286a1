"""Knowledge distillation from logits: one program per row (a token's V classes).

Same contract and formulas as csrc/distillation.cpp. With a = s / T, b = t / T, q = softmax(a),
p = softmax(b), hard weight h and class target y:
  beta = 0: D = KL(p || q);  beta = 1: D = KL(q || p);
  else D = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
  row loss = T^2 D + h (lse(s) - s_y)                        (0 for an ignored row)
  dL/ds_j = T dD/da_j + h (softmax(s)_j - [j == y]), with
    beta = 0: dD/da_j = q_j - p_j
    beta = 1: dD/da_j = q_j (log q_j - log p_j - K),            K = KL(q || p)
    JSD:      dD/da_j = (1 - beta) q_j (log q_j - log m_j - K), K = KL(q || m)
Forward reads both rows once for the KL cases (online lse of a and b plus the rescaled sum of
exp(b - m_b)(b - a), or exp(a - m_a)(a - b) for reverse; zero-probability terms are 0), twice for
the JSD (log m needs both normalisers). Backward reads them once more and writes the gradient from
the per-row statistics [lse_a, lse_b, K, lse(s), 1 - p_y], with grad_output folded in.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, device_guard, float_arg, log1p, online_lse_step, row_block,
                      row_finish, row_setup, tl_acc)

N_STATS = 5


@triton.jit
def _kd_row(S, stride_sn, TARGET, C, ignore_index, HAS_TARGET: tl.constexpr):
    """(row, student row pointer, target, valid): row_setup's, or every row valid without target."""
    if HAS_TARGET:
        row, s_row, y, valid = row_setup(S, stride_sn, 0, 1, TARGET, C, ignore_index)
    else:
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * stride_sn
        y = tl.zeros((), tl.int64)
        valid = row >= 0
    return row, s_row, y, valid


@triton.jit
def _params(inv_t, temp, beta, log_b, log_1mb, c, hw, ACC: tl.constexpr):
    """The float options (declared tl.float64 in the kernels) in the acc dtype."""
    return (float_arg(inv_t, ACC), float_arg(temp, ACC), float_arg(beta, ACC),
            float_arg(log_b, ACC), float_arg(log_1mb, ACC), float_arg(c, ACC), float_arg(hw, ACC))


@triton.jit
def _log_mix(lp, lq, log_b, log_1mb):
    """log(beta p + (1 - beta) q) from log p and log q."""
    u = lp + log_b
    v = lq + log_1mb
    return tl.maximum(u, v) + log1p(tl.exp(-tl.abs(u - v)))


@triton.jit
def _kd_dda(a, b, lse_a, lse_b, k, c, log_b, log_1mb, MODE: tl.constexpr):
    """dD/da from a, b and the row's lse_a, lse_b, K (= k); c = 1 - beta (JSD) or 1."""
    lq = a - lse_a
    q = tl.exp(lq)
    lp = b - lse_b
    if MODE == 0:
        d = q - tl.exp(lp)
    else:
        if MODE == 1:
            lm = lp
        else:
            lm = _log_mix(lp, lq, log_b, log_1mb)
        d = tl.where(q > 0, c * q * (lq - lm - k), 0.0)
    return d


@triton.jit
def _distill_fwd_kernel(
    S, stride_sn, stride_sc, T, stride_tn, stride_tc, TARGET, LOSS, STATS,
    C, ignore_index, inv_t_: tl.float64, temp_: tl.float64, beta_: tl.float64,
    log_b_: tl.float64, log_1mb_: tl.float64, c_: tl.float64, hw_: tl.float64,
    MODE: tl.constexpr, HAS_TARGET: tl.constexpr, HARD: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    inv_t, temp, beta, log_b, log_1mb, c, hard_weight = _params(
        inv_t_, temp_, beta_, log_b_, log_1mb_, c_, hw_, ACC)
    row, s_row, y, valid = _kd_row(S, stride_sn, TARGET, C, ignore_index, HAS_TARGET)
    t_row = T + row * stride_tn
    c_read = tl.where(valid, C, 0)
    neg_inf = tl.full((), float("-inf"), ACC)
    m_a = neg_inf
    m_b = neg_inf
    s_a = tl.zeros((), ACC)
    s_b = tl.zeros((), ACC)
    d = tl.zeros((), ACC)
    x_y = tl.load(s_row + y * stride_sc).to(ACC)
    m_ce = tl.where(valid, x_y, 0.0).to(ACC)  # the hard term: j != y, seeded with x_y
    s_ce = tl.zeros((), ACC)
    for off in range(0, C, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < c_read
        sv = tl.load(s_row + cols.to(tl.int64) * stride_sc, mask=mask, other=float("-inf")).to(ACC)
        tv = tl.load(t_row + cols.to(tl.int64) * stride_tc, mask=mask, other=float("-inf")).to(ACC)
        a = sv * inv_t
        b = tv * inv_t
        ma_new = tl.maximum(m_a, tl.max(a, 0))
        mb_new = tl.maximum(m_b, tl.max(b, 0))
        # a shift of 0 while a row is all -inf so far keeps exp's argument free of -inf - -inf
        sh_a = tl.where(ma_new == float("-inf"), 0.0, ma_new)
        sh_b = tl.where(mb_new == float("-inf"), 0.0, mb_new)
        fa = tl.exp(m_a - sh_a)
        fb = tl.exp(m_b - sh_b)
        ea = tl.exp(a - sh_a)
        eb = tl.exp(b - sh_b)
        s_a = s_a * fa + tl.sum(ea, 0)
        s_b = s_b * fb + tl.sum(eb, 0)
        if MODE == 1:
            d = d * fa + tl.sum(tl.where(ea > 0, ea * (a - b), 0.0), 0)
        else:
            d = d * fb + tl.sum(tl.where(eb > 0, eb * (b - a), 0.0), 0)
        m_a = sh_a
        m_b = sh_b
        if HARD:
            m_ce, s_ce = online_lse_step(m_ce, s_ce, tl.where(mask & (cols != y), sv,
                                                              float("-inf")))
    lse_a = m_a + tl.log(s_a)
    lse_b = m_b + tl.log(s_b)
    k = tl.zeros((), ACC)
    if MODE == 0:
        div = d / s_b - lse_b + lse_a
    elif MODE == 1:
        div = d / s_a - lse_a + lse_b
        k = div
    else:
        div = tl.zeros((), ACC)
        for off in range(0, C, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < c_read
            sv = tl.load(s_row + cols.to(tl.int64) * stride_sc, mask=mask, other=0.0).to(ACC)
            tv = tl.load(t_row + cols.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(ACC)
            lq = sv * inv_t - lse_a
            lp = tv * inv_t - lse_b
            q = tl.exp(lq)
            p = tl.exp(lp)
            lm = _log_mix(lp, lq, log_b, log_1mb)
            tq = tl.where(mask & (q > 0), q * (lq - lm), 0.0)
            tp = tl.where(mask & (p > 0), p * (lp - lm), 0.0)
            div += tl.sum(beta * tp + (1.0 - beta) * tq, 0)
            k += tl.sum(tq, 0)
    loss = temp * temp * div
    lse_s = tl.zeros((), ACC)
    q_ce = tl.zeros((), ACC)
    if HARD:
        lse_s, nll, q_ce = row_finish(m_ce, s_ce, x_y)
        loss += hard_weight * nll
    st = row * 5  # (int64: every pointer offset is 64-bit)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    tl.store(STATS + st, tl.where(valid, lse_a, 0.0))
    tl.store(STATS + (st + 1), tl.where(valid, lse_b, 0.0))
    tl.store(STATS + (st + 2), tl.where(valid, k, 0.0))
    tl.store(STATS + (st + 3), tl.where(valid, lse_s, 0.0))
    tl.store(STATS + (st + 4), tl.where(valid, q_ce, 0.0))


@triton.jit
def _distill_bwd_kernel(
    S, stride_sn, stride_sc, T, stride_tn, stride_tc, TARGET, STATS, GRAD_SCALE,
    G, stride_gn, stride_gc,
    C, ignore_index, inv_t_: tl.float64, temp_: tl.float64, beta_: tl.float64,
    log_b_: tl.float64, log_1mb_: tl.float64, c_: tl.float64, hw_: tl.float64,
    MODE: tl.constexpr, HAS_TARGET: tl.constexpr, HARD: tl.constexpr,
    PER_ROW_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    inv_t, temp, beta, log_b, log_1mb, c, hard_weight = _params(
        inv_t_, temp_, beta_, log_b_, log_1mb_, c_, hw_, ACC)
    row, s_row, y, valid = _kd_row(S, stride_sn, TARGET, C, ignore_index, HAS_TARGET)
    t_row = T + row * stride_tn
    g_row = G + row * stride_gn
    st = row * 5  # (int64: every pointer offset is 64-bit)
    lse_a = tl.load(STATS + st).to(ACC)
    lse_b = tl.load(STATS + (st + 1)).to(ACC)
    k = tl.load(STATS + (st + 2)).to(ACC)
    lse_s = tl.load(STATS + (st + 3)).to(ACC)
    q_ce = tl.load(STATS + (st + 4)).to(ACC)
    scale = tl.load(GRAD_SCALE + row).to(ACC) if PER_ROW_SCALE else tl.load(GRAD_SCALE).to(ACC)
    # read before the sweep: G may be the student's own memory
    s_y = tl.load(s_row + y * stride_sc).to(ACC)
    t_y = tl.load(t_row + y * stride_tc).to(ACC)
    c_read = tl.where(valid, C, 0)
    for off in range(0, C, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < c_read
        sv = tl.load(s_row + cols.to(tl.int64) * stride_sc, mask=mask, other=0.0).to(ACC)
        tv = tl.load(t_row + cols.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(ACC)
        g = temp * _kd_dda(sv * inv_t, tv * inv_t, lse_a, lse_b, k, c, log_b, log_1mb, MODE)
        if HARD:
            g += hard_weight * tl.exp(sv - lse_s)
        g = tl.where(mask, g * scale, 0.0)
        tl.store(g_row + cols.to(tl.int64) * stride_gc, g.to(G.dtype.element_ty), mask=cols < C)
    if HARD:
        # h (p_y - 1) = -h (1 - p_y), with 1 - p_y from forward (no cancellation)
        d_y = _kd_dda(s_y * inv_t, t_y * inv_t, lse_a, lse_b, k, c, log_b, log_1mb, MODE)
        g_y = (temp * d_y - hard_weight * q_ce) * scale
        tl.store(g_row + y * stride_gc, g_y.to(G.dtype.element_ty), mask=valid)


def _consts(student, temperature, beta, hard_weight, target):
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if hard_weight != 0 and target is None:
        raise ValueError("hard_weight > 0 needs a target")
    mode = 0 if beta == 0 else (1 if beta == 1 else 2)
    log_b = math.log(beta) if mode == 2 else 0.0
    log_1mb = math.log1p(-beta) if mode == 2 else 0.0
    c = 1.0 - beta if mode == 2 else 1.0
    params = [float(x) for x in (1.0 / temperature, temperature, beta, log_b, log_1mb, c,
                                 hard_weight)]
    return params, dict(MODE=mode, HAS_TARGET=target is not None,
                                      HARD=hard_weight != 0, ACC=tl_acc(student.dtype))


def distill_fwd(student, teacher, target, temperature, beta, ignore_index, hard_weight):
    """Per-row (loss, stats [rows, 5]) in the acc dtype for student / teacher logits [rows, V]."""
    R, C = student.shape
    acc = acc_dtype(student.dtype)
    loss = torch.empty(R, dtype=acc, device=student.device)
    stats = torch.empty(R, N_STATS, dtype=acc, device=student.device)
    params, consts = _consts(student, temperature, beta, hard_weight, target)
    if R == 0:
        return loss, stats
    block, num_warps = row_block(C)
    with device_guard(student):
        _distill_fwd_kernel[(R,)](
            student, *student.stride(), teacher, *teacher.stride(),
            target if target is not None else loss, loss, stats, C, ignore_index, *params,
            BLOCK=block, num_warps=num_warps, **consts,
        )
    return loss, stats


def distill_bwd(grad_scale, student, teacher, target, stats, temperature, beta, ignore_index,
                hard_weight, grad=None):
    """Gradient of the per-row loss times grad_scale (a scalar or one per row), into `grad`
    (the student's logits for the in-place variant) or a new contiguous tensor."""
    R, C = student.shape
    if grad is None:
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    params, consts = _consts(student, temperature, beta, hard_weight, target)
    if R == 0:
        return grad
    block, num_warps = row_block(C)
    with device_guard(student):
        _distill_bwd_kernel[(R,)](
            student, *student.stride(), teacher, *teacher.stride(),
            target if target is not None else stats, stats, grad_scale, grad, *grad.stride(),
            C, ignore_index, *params, PER_ROW_SCALE=grad_scale.numel() != 1,
            BLOCK=block, num_warps=num_warps, **consts,
        )
    return grad


def distill_bwd_inplace(grad_scale, student, teacher, target, stats, temperature, beta,
                        ignore_index, hard_weight):
    distill_bwd(grad_scale, student, teacher, target, stats, temperature, beta, ignore_index,
                hard_weight, grad=student)
