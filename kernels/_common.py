"""Helpers shared by the Triton kernels: the device guard of every launch, block-size heuristics,
the online log-sum-exp step, log1p, and the row machinery of the softmax losses (csrc/rows.h's
twin)."""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class device_guard:
    """`with device_guard(t): kernel[grid](...)` around every launch. Triton launches on the
    current CUDA device, which on a multi-GPU rank need not be t's; this makes it t's for the
    launch (torch.cuda.device). A no-op for CPU tensors (the interpreter). `active` holds the
    devices of the guards entered, innermost last: the tests check that every launch is inside one.
    """

    active = []

    def __init__(self, t: torch.Tensor):
        self.device = t.device
        self._cuda = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self._cuda is not None:
            self._cuda.__enter__()
        device_guard.active.append(self.device)
        return self

    def __exit__(self, *exc):
        device_guard.active.pop()
        if self._cuda is not None:
            return self._cuda.__exit__(*exc)
        return False


def row_block(n_cols: int, max_block: int = 8192):
    """BLOCK and num_warps for one program sweeping a row of n_cols in blocks.

    On a GPU 8192 fp32 per block keeps registers in check with 16 warps; the interpreter runs one
    numpy op per block, so there a wider block is simply faster.
    """
    cap = 1 << 16 if INTERPRET else max_block
    block = min(triton.next_power_of_2(max(n_cols, 1)), cap)
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def float_arg(v, ACC: tl.constexpr):
    """A float kernel argument in the acc dtype. Declare it `v: tl.float64` in the kernel's
    signature: Triton passes an undeclared Python float as fp32, which would round eps, alpha or
    gamma for fp64 inputs; an fp32 kernel gets fp32(v), rounded once here."""
    return (tl.zeros((), ACC) + v).to(ACC)


@triton.jit
def online_lse_step(m, s, x):
    """Fold a block x (masked lanes = -inf) into the running max m and sum s of exp(. - m)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    # m_new is -inf only while every value so far is -inf; keep exp's argument finite then.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
    return m_new, s


@triton.jit
def log1p(t):
    """log(1 + t) for t >= 0 without losing small t (Goldberg: log(u) * t / (u - 1), u = 1 + t)."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 2.0, u - 1.0)))


@triton.jit
def row_setup(X, stride_xn, stride_xd, D, TARGET, C, ignore_index):
    """This program's row of logits viewed as [N, C, D]: (row, row pointer, target, valid).

    Out-of-range targets are reported before launch (or by a device-side check); here they only
    must not read out of bounds, so they are treated like ignored rows (target 0, valid False).
    """
    row = tl.program_id(0).to(tl.int64)
    n = row // D
    x_row = X + n * stride_xn + (row - n * D) * stride_xd
    y = tl.load(TARGET + row)
    valid = (y != ignore_index) & (y >= 0) & (y < C)
    return row, x_row, tl.where(valid, y, 0), valid


@triton.jit
def row_stats(x_row, stride_xc, C, y, valid, WEIGHT, HAS_WEIGHT: tl.constexpr,
              SUM_WX: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One read of a row with target y: (lse, nll, q, swx, w_sum), where nll = lse - x_y and
    q = 1 - p_y come without cancellation (the sum of exp(x_j - m) runs over j != y, see
    csrc/rows.h), and, if SUM_WX, swx = sum_c w_c x_c and w_sum = sum_c w_c (w = 1 without
    weights) for label smoothing. Invalid rows read nothing (their results are unused)."""
    x_y = tl.load(x_row + y * stride_xc).to(ACC)
    c_read = tl.where(valid, C, 0)
    m = tl.where(valid, x_y, 0.0).to(ACC)  # the max starts at x_y, so that e_y <= 1
    s = tl.zeros((), ACC)
    swx = tl.zeros((), ACC)
    w_sum = tl.zeros((), ACC)
    for off in range(0, C, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols.to(tl.int64) * stride_xc, mask=cols < c_read, other=0.0).to(ACC)
        if SUM_WX:
            if HAS_WEIGHT:
                w = tl.load(WEIGHT + cols.to(tl.int64), mask=cols < C, other=0.0).to(ACC)
                swx += tl.sum(w * x, 0)
                w_sum += tl.sum(w, 0)
            else:
                swx += tl.sum(x, 0)
        m, s = online_lse_step(m, s, tl.where((cols < c_read) & (cols != y), x, float("-inf")))
    lse, nll, q = row_finish(m, s, x_y)
    return lse, nll, q, swx, w_sum


@triton.jit
def row_finish(m, s, x_y):
    """(lse, nll, q) from the max m (x_y included), s = sum_{j != y} exp(x_j - m) and x_y:
    lse = m + log(s + e_y), nll = log1p(s / e_y), q = s / (s + e_y), e_y = exp(x_y - m) <= 1.
    Where e_y < 2^-60 the loss is > 41 and lse - x_y loses nothing (s / e_y could overflow)."""
    e_y = tl.exp(x_y - m)
    tot = s + e_y
    lse = m + tl.log(tot)
    near = e_y > 8.673617379884035e-19
    nll = tl.where(near, log1p(s / tl.where(near, e_y, 1.0)), lse - x_y)
    return lse, nll, s / tot
