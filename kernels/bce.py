"""Weighted BCE-with-logits, element-wise over broadcast operands (kernels/_elementwise.py).

Same contract and formulas as csrc/bce.cpp; one kernel serves forward (COMPUTE_LOSS) and backward
(GRAD_X / GRAD_Y, times grad_out). From e = exp(-|x|):
  softplus(+-x) = max(+-x, 0) + log1p(e);  sigmoid(x), sigmoid(-x) = 1/(1+e), e/(1+e) (by sign)
  L     = w (pw y softplus(-x) + (1-y) softplus(x))
  dL/dx = w ((1-y) sigmoid(x) - pw y sigmoid(-x))      (sigmoid(-x) never as 1 - sigmoid(x))
  dL/dy = w (pw softplus(-x) - softplus(x))
"""
import triton
import triton.language as tl

from ._common import log1p
from ._elementwise import coords4, finish, launch, load4


@triton.jit
def _bce_kernel(
    X, Y, W, PW, GO, LOSS, GX, GY, numel, D1, D2, D3,
    sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3, sw0, sw1, sw2, sw3, sp0, sp1, sp2, sp3,
    sg0, sg1, sg2, sg3,
    HAS_W: tl.constexpr, HAS_PW: tl.constexpr, REDUCTION: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, CONTIG: tl.constexpr, GO_SCALAR: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    i0, i1, i2, i3 = coords4(idx, D1, D2, D3, CONTIG)
    x = load4(X, i0, i1, i2, i3, sx0, sx1, sx2, sx3, mask, ACC, CONTIG)
    y = load4(Y, i0, i1, i2, i3, sy0, sy1, sy2, sy3, mask, ACC, CONTIG)
    w = load4(W, i0, i1, i2, i3, sw0, sw1, sw2, sw3, mask, ACC, CONTIG) if HAS_W else 1.0
    pw = load4(PW, i0, i1, i2, i3, sp0, sp1, sp2, sp3, mask, ACC, CONTIG) if HAS_PW else 1.0
    e = tl.exp(-tl.abs(x))
    l1p = log1p(e)
    sp_pos = tl.maximum(x, 0.0) + l1p  # softplus(x)
    sp_neg = tl.maximum(-x, 0.0) + l1p  # softplus(-x)
    r = 1.0 / (1.0 + e)
    sig_pos = tl.where(x >= 0, r, e * r)  # sigmoid(x)
    sig_neg = tl.where(x >= 0, e * r, r)  # sigmoid(-x)
    a = pw * y
    b = 1.0 - y
    loss = w * (a * sp_neg + b * sp_pos)
    gx = w * (b * sig_pos - a * sig_neg)
    gy = w * (pw * sp_neg - sp_pos)
    finish(LOSS, GX, GY, GO, pid, idx, i0, i1, i2, i3, sg0, sg1, sg2, sg3, mask, loss, gx,
           gy, numel, REDUCTION, COMPUTE_LOSS, GRAD_X, GRAD_Y, ACC, CONTIG, GO_SCALAR)


def bce_fwd(input, target, weight, pos_weight, reduction):
    """Launch on 4-d views; same contract as torch.ops.fusedloss.bce_fwd."""
    return launch(_bce_kernel, input, target, weight, pos_weight, None, reduction, True, False,
                  False)[0]


def bce_bwd(grad_out, input, target, weight, pos_weight, reduction, grad_input, grad_target):
    """Launch on 4-d views; same contract as torch.ops.fusedloss.bce_bwd."""
    return launch(_bce_kernel, input, target, weight, pos_weight, grad_out, reduction, False,
                  grad_input, grad_target)[1:]
