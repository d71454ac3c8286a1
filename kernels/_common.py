"""Helpers shared by the Triton kernels: block-size heuristics, the online log-sum-exp step, expm1."""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def online_lse_step(m, s, x):
    """Fold a block x (masked lanes = -inf) into the running max m and sum s of exp(. - m)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    # m_new is -inf only while every value so far is -inf; keep exp's argument finite then.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
    return m_new, s


@triton.jit
def expm1(t):
    """exp(t) - 1 without cancellation near 0 (Kahan: (u - 1) * t / log(u), u = exp(t))."""
    u = tl.exp(t)
    small = tl.abs(t) < 0.5
    um1 = u - 1.0
    safe_u = tl.where(small & (u != 1.0), u, 2.0)  # keep log() away from 0 on unused lanes
    kahan = tl.where(u == 1.0, t, um1 * t / tl.log(safe_u))
    return tl.where(small, kahan, um1)


@triton.jit
def log1p(t):
    """log(1 + t) for t >= 0 without losing small t (Goldberg: log(u) * t / (u - 1), u = 1 + t)."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 2.0, u - 1.0)))
