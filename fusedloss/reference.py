"""Plain-PyTorch implementations of the kernel contracts.

Each function here computes exactly what the matching C++ op and Triton launcher compute, with
ordinary tensor ops in the accumulation dtype (fp32, or fp64 for fp64 inputs). Tests compare the
kernels against these (and against torch itself) in float64; they are also the last-resort backend
when the C++ extension is not built.
"""
import math

import torch
import torch.nn.functional as F


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ce_setup(logits, target, weight, ignore_index):
    """Rows [N*D, C] in the acc dtype, validity, safe targets and weights (ones without weight)."""
    N, C, D = logits.shape
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc).permute(0, 2, 1).reshape(N * D, C)
    valid = (target != ignore_index) & (target >= 0) & (target < C)
    y = torch.where(valid, target, 0)
    w = torch.ones(C, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    return x, valid, y, w


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss):
    """Reference for fusedloss::cross_entropy_fwd: logits [N, C, D], target [N*D] int64.

    Returns the per-row (loss, lse) in the acc dtype; ignored rows give 0.
    """
    x, valid, y, w = _ce_setup(logits, target, weight, ignore_index)
    eps, C = float(label_smoothing), x.shape[1]
    lse = torch.logsumexp(x, dim=1)
    x_y = x.gather(1, y[:, None])[:, 0]
    loss = (1 - eps) * w[y] * (lse - x_y)
    if eps:  # zero-coefficient terms dropped, not multiplied by 0 (lse may be huge)
        loss = loss + (eps / C) * (w.sum() * lse - x @ w)
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0.0), torch.where(valid, lse, 0.0)


def cross_entropy_bwd(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing,
                      z_loss, grad=None):
    """Reference for fusedloss::cross_entropy_bwd: d(loss_row)/d(logits) * grad_scale (a scalar or
    one per row), written into `grad` when given."""
    N, C, D = logits.shape
    x, valid, y, w = _ce_setup(logits, target, weight, ignore_index)
    eps = float(label_smoothing)
    w_y = w[y]
    a = (1 - eps) * w_y + (eps / C) * w.sum() + 2 * z_loss * lse
    g = torch.exp(x - lse[:, None]) * a[:, None] - (eps / C) * w
    g.scatter_add_(1, y[:, None], (-(1 - eps) * w_y)[:, None])
    g = g * grad_scale.reshape(-1, 1).to(g.dtype)
    g = torch.where(valid[:, None], g, 0.0).reshape(N, D, C).permute(0, 2, 1)
    if grad is None:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return grad.copy_(g)


def cross_entropy_bwd_inplace(grad_scale, logits, target, lse, weight, ignore_index,
                              label_smoothing, z_loss):
    cross_entropy_bwd(grad_scale, logits, target, lse, weight, ignore_index, label_smoothing,
                      z_loss, grad=logits)


# Focal losses (fusedloss::sigmoid_focal_fwd, fusedloss::softmax_focal_fwd). The formulas and the
# derivation of the gradients are in csrc/focal.cpp; chunk of the reduced sigmoid loss: 4096.
_FOCAL_CHUNK = 4096


def _pow_gamma(q, gamma):
    """q^gamma for q in [0, 1], with 0^0 = 1."""
    return torch.ones_like(q) if gamma == 0 else q.pow(gamma)


def sigmoid_focal_fwd(input, target, grad_scale, alpha, gamma, reduce, compute_grad):
    """Reference for fusedloss::sigmoid_focal_fwd: element-wise loss (or per-4096-chunk partial
    sums if reduce) in the acc dtype and, if compute_grad, d(loss)/d(input) * grad_scale."""
    acc = acc_dtype(input.dtype)
    x, y = input.to(acc), target.to(acc)
    a = x.abs()
    e = torch.exp(-a)
    pos = x >= 0
    u = torch.where(pos, 1 - y, y)
    v = torch.where(pos, y, 1 - y)
    d = u + v * e
    qg = _pow_gamma(d / (1 + e), gamma)
    ce = a * u + torch.log1p(e)
    at = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else torch.ones_like(y)
    loss = at * ce * qg
    if reduce:
        flat = loss.reshape(-1)
        pad = (-flat.numel()) % _FOCAL_CHUNK
        loss = torch.cat([flat, flat.new_zeros(pad)]).view(-1, _FOCAL_CHUNK).sum(1)
    if not compute_grad:
        return loss, input.new_empty(0)
    r = torch.where(d > 0, e / ((1 + e) * torch.where(d > 0, d, 1.0)), 1.0)
    b = (u - v * e) / (1 + e) + gamma * (u - v) * r * ce
    g = at * qg * torch.where(pos, b, -b)
    if grad_scale is not None:
        g = g * grad_scale.to(acc)
    return loss, g.to(input.dtype)


def softmax_focal_fwd(logits, target, alpha, grad_scale, ignore_index, gamma, compute_grad):
    """Reference for fusedloss::softmax_focal_fwd: logits [N, C, D], target [N*D] int64."""
    N, C, D = logits.shape
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc).permute(0, 2, 1).reshape(N * D, C)
    valid = (target != ignore_index) & (target >= 0) & (target < C)
    t = torch.where(valid, target, 0)
    lse = torch.logsumexp(x, dim=1)
    lp = (x.gather(1, t[:, None])[:, 0] - lse).clamp(max=0)
    q = -torch.expm1(lp)
    a_t = torch.ones_like(lp) if alpha is None else alpha.to(acc)[t]
    qg = _pow_gamma(q, gamma)
    loss = torch.where(valid, -a_t * qg * lp, 0.0)
    if not compute_grad:
        return loss, logits.new_empty(0)
    ratio = torch.where(q > 0, lp / torch.where(q > 0, q, 1.0), -1.0)
    a = a_t * qg * (1 - gamma * torch.exp(lp) * ratio)
    if grad_scale is not None:
        a = a * grad_scale.to(acc)
    a = torch.where(valid, a, 0.0)
    g = torch.exp(x - lse[:, None]) * a[:, None]
    g.scatter_(1, t[:, None], (-a * q)[:, None])
    g = g.reshape(N, D, C).permute(0, 2, 1)
    return loss, g.to(logits.dtype).contiguous()


def _elementwise_result(input, loss, gx, gy, grad_out, reduction, grad_input, grad_target):
    """The element-wise ops' outputs (csrc/elementwise.h) from acc-dtype loss and gradients:
    forward (grad_out None) the loss; backward the gradients times grad_out (and 1/numel for
    mean), in the acc dtype."""
    n = input.numel()
    if grad_out is None:
        if reduction == 0:
            return loss.to(input.dtype).contiguous()
        return loss.sum() / n if reduction == 1 else loss.sum()
    s = grad_out.to(loss.dtype) * (1.0 / n if reduction == 1 else 1.0)
    empty = input.new_empty(0)
    return (((gx * s).to(input.dtype).contiguous() if grad_input else empty),
            ((gy * s).to(input.dtype).contiguous() if grad_target else empty))


def _bce_terms(input, target, weight, pos_weight):
    acc = acc_dtype(input.dtype)
    x, y = input.to(acc), target.to(acc)
    w = 1.0 if weight is None else weight.to(acc)
    pw = 1.0 if pos_weight is None else pos_weight.to(acc)
    e = torch.exp(-x.abs())
    sp_pos = x.clamp(min=0) + torch.log1p(e)  # softplus(x)
    sp_neg = (-x).clamp(min=0) + torch.log1p(e)  # softplus(-x)
    sig_pos = torch.where(x >= 0, 1 / (1 + e), e / (1 + e))  # sigmoid(x)
    sig_neg = torch.where(x >= 0, e / (1 + e), 1 / (1 + e))  # sigmoid(-x)
    loss = w * (pw * y * sp_neg + (1 - y) * sp_pos)
    gx = w * ((1 - y) * sig_pos - pw * y * sig_neg)
    gy = w * (pw * sp_neg - sp_pos)
    return loss, gx, gy


def bce_fwd(input, target, weight, pos_weight, reduction):
    """Reference for fusedloss::bce_fwd (operands of one shape, weights broadcast views)."""
    loss, gx, gy = _bce_terms(input, target, weight, pos_weight)
    return _elementwise_result(input, loss, gx, gy, None, reduction, False, False)


def bce_bwd(grad_out, input, target, weight, pos_weight, reduction, grad_input, grad_target):
    """Reference for fusedloss::bce_bwd."""
    loss, gx, gy = _bce_terms(input, target, weight, pos_weight)
    return _elementwise_result(input, loss, gx, gy, grad_out, reduction, grad_input, grad_target)


def _huber_terms(input, target, weight, delta, smooth_l1):
    """Huber(delta), or SmoothL1(beta=delta) (0: L1)."""
    if not (delta >= 0 if smooth_l1 else delta > 0):
        raise ValueError(f"delta must be > 0 (beta >= 0 for smooth_l1), got {delta}")
    acc = acc_dtype(input.dtype)
    w = 1.0 if weight is None else weight.to(acc)
    d = input.to(acc) - target.to(acc)
    k = (1.0 / delta if delta > 0 else 0.0) if smooth_l1 else 1.0
    m = 1.0 if smooth_l1 else delta
    quad = d.abs() < delta
    loss = w * torch.where(quad, 0.5 * k * d * d, m * (d.abs() - 0.5 * delta))
    gx = w * torch.where(quad, k * d, m * torch.sign(d))
    return loss, gx, -gx


def huber_fwd(input, target, weight, delta, smooth_l1, reduction):
    """Reference for fusedloss::huber_fwd."""
    loss, gx, gy = _huber_terms(input, target, weight, delta, smooth_l1)
    return _elementwise_result(input, loss, gx, gy, None, reduction, False, False)


def huber_bwd(grad_out, input, target, weight, delta, smooth_l1, reduction, grad_input,
              grad_target):
    """Reference for fusedloss::huber_bwd."""
    loss, gx, gy = _huber_terms(input, target, weight, delta, smooth_l1)
    return _elementwise_result(input, loss, gx, gy, grad_out, reduction, grad_input, grad_target)


def torchvision_sigmoid_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2.0):
    """torchvision.ops.sigmoid_focal_loss (reduction 'none'), written out as torchvision does:
    the eager formula the tests and bench compare with (torchvision is not a dependency)."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def stable_nll(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p_y per row of x [N, C] (class-index targets), in float64 and without cancellation
    on confident rows: log1p(sum_{j != y} exp(x_j - x_y)), where lse - x_y loses everything once
    the margin passes ~37 (float64) or ~17 (fp32). Differentiable; the tests' reference for the
    loss and gradient of confident rows (1 - p_y = -expm1(-nll))."""
    x = x.double()
    d = x - x.gather(1, target[:, None])
    d = d.masked_fill(torch.nn.functional.one_hot(target, x.shape[1]).bool(), float("-inf"))
    return torch.log1p(torch.exp(d).sum(1))


def _kl_div_terms(input, target, log_target):
    """torch's kl_div terms, except that a zero target contributes 0 where torch's 0 * inf is
    NaN (csrc/kl_div.cpp)."""
    acc = acc_dtype(input.dtype)
    x, y = input.to(acc), target.to(acc)
    if log_target:
        e = torch.exp(y)
        zero = y == float("-inf")
        loss = torch.where(zero, 0.0, e * (y - x))
        return loss, -e, torch.where(zero, 0.0, e * (y - x + 1))
    yx = torch.where((y == 0) & (x == float("-inf")), 0.0, y * x)
    loss = torch.xlogy(y, y) - yx
    gy = torch.where(y == 0, float("nan"), torch.log(y) + 1 - x)
    return loss, -y, gy


def kl_div_fwd(input, target, log_target, reduction):
    """Reference for fusedloss::kl_div_fwd."""
    loss, gx, gy = _kl_div_terms(input, target, log_target)
    return _elementwise_result(input, loss, gx, gy, None, reduction, False, False)


def kl_div_bwd(grad_out, input, target, log_target, reduction, grad_input, grad_target):
    """Reference for fusedloss::kl_div_bwd."""
    loss, gx, gy = _kl_div_terms(input, target, log_target)
    return _elementwise_result(input, loss, gx, gy, grad_out, reduction, grad_input, grad_target)


# Distillation (fusedloss::distill_fwd / distill_bwd): formulas in csrc/distillation.cpp.
def _distill_terms(student, teacher, temperature, beta):
    """Rows of a = s / T, b = t / T in the acc dtype: (lq, lp, q, p, lse_a, lse_b, log m)."""
    acc = acc_dtype(student.dtype)
    a, b = student.to(acc) / temperature, teacher.to(acc) / temperature
    lse_a, lse_b = torch.logsumexp(a, 1), torch.logsumexp(b, 1)
    lq, lp = a - lse_a[:, None], b - lse_b[:, None]
    lm = None
    if 0 < beta < 1:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return lq, lp, lq.exp(), lp.exp(), lse_a, lse_b, lm


def _xlog(p, d):
    """p * d with 0 where p == 0 (d may be infinite there)."""
    return torch.where(p > 0, p * d, 0.0)


def _distill_valid(student, target, ignore_index):
    R, C = student.shape
    if target is None:
        return torch.ones(R, dtype=torch.bool, device=student.device), None
    valid = (target != ignore_index) & (target >= 0) & (target < C)
    return valid, torch.where(valid, target, 0)


def distill_fwd(student, teacher, target, temperature, beta, ignore_index, hard_weight):
    """Reference for fusedloss::distill_fwd: per-row (loss, stats [rows, 5]) in the acc dtype."""
    lq, lp, q, p, lse_a, lse_b, lm = _distill_terms(student, teacher, temperature, beta)
    k = torch.zeros_like(lse_a)
    if beta == 0:
        div = _xlog(p, lp - lq).sum(1)
    elif beta == 1:
        div = k = _xlog(q, lq - lp).sum(1)
    else:
        k = _xlog(q, lq - lm).sum(1)
        div = beta * _xlog(p, lp - lm).sum(1) + (1 - beta) * k
    loss = temperature ** 2 * div
    valid, y = _distill_valid(student, target, ignore_index)
    lse_s = torch.zeros_like(lse_a)
    q_ce = torch.zeros_like(lse_a)
    if hard_weight:
        x = student.to(lse_a.dtype)
        lse_s = torch.logsumexp(x, 1)
        lp_y = x.gather(1, y[:, None])[:, 0] - lse_s
        loss = loss + hard_weight * -lp_y
        q_ce = -torch.expm1(lp_y)
    stats = torch.stack([lse_a, lse_b, k, lse_s, q_ce], 1)
    return torch.where(valid, loss, 0.0), torch.where(valid[:, None], stats, 0.0)


def distill_bwd(grad_scale, student, teacher, target, stats, temperature, beta, ignore_index,
                hard_weight, grad=None):
    """Reference for fusedloss::distill_bwd: d(loss_row)/d(student) * grad_scale."""
    lq, lp, q, p, lse_a, lse_b, lm = _distill_terms(student, teacher, temperature, beta)
    k = stats[:, 2:3]
    if beta == 0:
        d = q - p
    elif beta == 1:
        d = _xlog(q, lq - lp - k)
    else:
        d = (1 - beta) * _xlog(q, lq - lm - k)
    g = temperature * d
    valid, y = _distill_valid(student, target, ignore_index)
    if hard_weight:
        x = student.to(g.dtype)
        g = g + hard_weight * torch.softmax(x, 1)
        g.scatter_add_(1, y[:, None], torch.full_like(g[:, :1], -hard_weight))
    g = torch.where(valid[:, None], g * grad_scale.reshape(-1, 1).to(g.dtype), 0.0)
    if grad is None:
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    return grad.copy_(g)


def distill_bwd_inplace(grad_scale, student, teacher, target, stats, temperature, beta,
                        ignore_index, hard_weight):
    distill_bwd(grad_scale, student, teacher, target, stats, temperature, beta, ignore_index,
                hard_weight, grad=student)
