"""KL divergence (torch's kl_div), element-wise over broadcast operands (kernels/_elementwise.py).

Same contract and formulas as csrc/kl_div.cpp; one kernel serves forward (COMPUTE_LOSS) and
backward (GRAD_X / GRAD_Y, times grad_out). x log-probability, y target:
  L = xlogy(y, y) - y x,   dL/dx = -y,     dL/dy = log y + 1 - x   (dL/dy = NaN at y = 0, as torch)
  L = e^y (y - x),         dL/dx = -e^y,   dL/dy = e^y (y - x + 1)          (LOG_TARGET)
A zero target (y = 0 with x = -inf; y = -inf in log space) contributes 0 where torch's 0 * inf is
NaN.
"""
import torch
import triton
import triton.language as tl

from ._elementwise import coords4, finish, launch, load4


@triton.jit
def _kl_div_kernel(
    X, Y, W, PW, GO, LOSS, GX, GY, numel, D1, D2, D3,
    sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3, sw0, sw1, sw2, sw3, sp0, sp1, sp2, sp3,
    sg0, sg1, sg2, sg3,
    LOG_TARGET: tl.constexpr,
    HAS_W: tl.constexpr, HAS_PW: tl.constexpr, REDUCTION: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    i0, i1, i2, i3 = coords4(idx, D1, D2, D3)
    x = load4(X, i0, i1, i2, i3, sx0, sx1, sx2, sx3, mask, ACC)
    y = load4(Y, i0, i1, i2, i3, sy0, sy1, sy2, sy3, mask, ACC)
    if LOG_TARGET:
        e = tl.exp(y)
        zero = y == float("-inf")  # exp(y) = 0: the term is 0 (torch: 0 * inf = NaN)
        loss = tl.where(zero, 0.0, e * (y - x))
        gx = -e
        gy = tl.where(zero, 0.0, e * (y - x + 1.0))
    else:
        ly = tl.log(y)  # -inf at 0, NaN below
        loss = tl.where(y == 0.0, 0.0, y * ly) - tl.where((y == 0.0) & (x == float("-inf")), 0.0,
                                                          y * x)
        gx = -y
        gy = tl.where(y == 0.0, float("nan"), ly + 1.0 - x)  # torch: xlogy's backward 0/0
    finish(LOSS, GX, GY, GO, pid, idx, i0, i1, i2, i3, sg0, sg1, sg2, sg3, mask, loss, gx,
           gy, numel, REDUCTION, COMPUTE_LOSS, GRAD_X, GRAD_Y, ACC)


def kl_div_fwd(input, target, log_target, reduction):
    """Launch on 4-d views (under the tensors' device: _elementwise.launch); same contract as
    torch.ops.fusedloss.kl_div_fwd."""
    return launch(_kl_div_kernel, input, target, None, None, None, reduction, True, False, False,
                  LOG_TARGET=bool(log_target))[0]


def kl_div_bwd(grad_out, input, target, log_target, reduction, grad_input, grad_target):
    """Launch on 4-d views; same contract as torch.ops.fusedloss.kl_div_bwd."""
    return launch(_kl_div_kernel, input, target, None, None, grad_out, reduction, False,
                  grad_input, grad_target, LOG_TARGET=bool(log_target))[1:]
