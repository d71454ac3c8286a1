"""Plain-PyTorch implementations of the kernel contracts.

Each function here computes exactly what the matching C++ op and Triton launcher compute, with
ordinary tensor ops in the accumulation dtype (fp32, or fp64 for fp64 inputs). Tests compare the
kernels against these (and against torch itself) in float64; they are also the last-resort backend
when the C++ extension is not built.
"""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cross_entropy_fwd(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                      compute_grad, grad=None):
    """Reference for fusedloss::cross_entropy_fwd: logits [N, C, D], target [N*D] int64.

    Returns per-row (loss, lse) in the acc dtype and, if compute_grad, the gradient of the per-row
    loss times grad_scale (written into `grad` when given).
    """
    N, C, D = logits.shape
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc).permute(0, 2, 1).reshape(N * D, C)  # rows
    valid = target != ignore_index
    y = torch.where(valid, target, 0).clamp(0, max(C - 1, 0))
    w = torch.ones(C, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    eps = float(label_smoothing)
    lse = torch.logsumexp(x, dim=1)
    x_y = x.gather(1, y[:, None])[:, 0] if C > 0 else torch.zeros_like(lse)
    w_y = w[y]
    loss = (1 - eps) * w_y * (lse - x_y)
    if eps:  # zero-coefficient terms dropped, not multiplied by 0 (lse may be huge)
        loss = loss + (eps / C) * (w.sum() * lse - x @ w)
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    lse = torch.where(valid, lse, 0.0)
    if not compute_grad:
        return loss, lse, logits.new_empty(0)
    a = (1 - eps) * w_y + (eps / C) * w.sum() + 2 * z_loss * lse
    g = torch.exp(x - lse[:, None]) * a[:, None] - (eps / C) * w
    g.scatter_add_(1, y[:, None], (-(1 - eps) * w_y)[:, None])
    if grad_scale is not None:
        g = g * grad_scale.to(acc)
    g = torch.where(valid[:, None], g, 0.0)
    g = g.reshape(N, D, C).permute(0, 2, 1)
    if grad is None:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad.copy_(g)
    return loss, lse, grad
