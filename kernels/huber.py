"""Huber / SmoothL1, element-wise over broadcast operands (kernels/_elementwise.py).

Same contract and formula as csrc/huber.cpp (one kernel for forward and backward, as in
kernels/bce.py), in d = x - y with threshold t = delta:
  L     = w (|d| < t ? k d^2 / 2 : m (|d| - t/2))
  dL/dx = w (|d| < t ? k d : m sign(d)),  dL/dy = -dL/dx,  sign(0) = 0
Huber: k = 1, m = delta. SmoothL1 (beta = delta): k = 1/beta, m = 1, with k d taken as d / beta
(a subnormal beta's 1/beta overflows; beta = 0 never takes the quadratic branch: exact L1). The
C++ loops use a branch-free clamp form instead (csrc/huber.cpp): on the GPU this kernel is bound
by memory, not by its selects. delta arrives as fp64 (exact in an fp64 kernel).
"""
import triton
import triton.language as tl

from ._common import float_arg
from ._elementwise import coords4, finish, launch, load4


@triton.jit
def _huber_kernel(
    X, Y, W, PW, GO, LOSS, GX, GY, numel, D1, D2, D3,
    sx0, sx1, sx2, sx3, sy0, sy1, sy2, sy3, sw0, sw1, sw2, sw3, sp0, sp1, sp2, sp3,
    sg0, sg1, sg2, sg3,
    delta: tl.float64,
    SMOOTH_L1: tl.constexpr,
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
    t = float_arg(delta, ACC)
    d = x - y
    if SMOOTH_L1:
        kd = d / tl.where(t > 0, t, 1.0)
        m = tl.full((), 1.0, ACC)
    else:
        kd = d
        m = t
    ad = tl.abs(d)
    quad = ad < t
    sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, d))  # 0 -> 0, NaN -> NaN
    loss = w * tl.where(quad, 0.5 * d * kd, m * (ad - 0.5 * t))
    gx = w * tl.where(quad, kd, m * sgn)
    finish(LOSS, GX, GY, GO, pid, idx, i0, i1, i2, i3, sg0, sg1, sg2, sg3, mask, loss, gx,
           -gx, numel, REDUCTION, COMPUTE_LOSS, GRAD_X, GRAD_Y, ACC, CONTIG, GO_SCALAR)


def _check_delta(delta, smooth_l1):
    if not (delta >= 0 if smooth_l1 else delta > 0):
        raise ValueError(f"delta must be > 0 (beta >= 0 for smooth_l1), got {delta}")


def huber_fwd(input, target, weight, delta, smooth_l1, reduction):
    """Launch on 4-d views; same contract as torch.ops.fusedloss.huber_fwd."""
    _check_delta(delta, smooth_l1)
    return launch(_huber_kernel, input, target, weight, None, None, reduction, True, False, False,
                  float(delta), SMOOTH_L1=smooth_l1)[0]


def huber_bwd(grad_out, input, target, weight, delta, smooth_l1, reduction, grad_input,
              grad_target):
    """Launch on 4-d views; same contract as torch.ops.fusedloss.huber_bwd."""
    _check_delta(delta, smooth_l1)
    return launch(_huber_kernel, input, target, weight, None, grad_out, reduction, False,
                  grad_input, grad_target, float(delta), SMOOTH_L1=smooth_l1)[1:]
