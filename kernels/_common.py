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


# Classes up to which a softmax loss processes several whole rows per program (rows_block).
ROWS_MAX_C = 2048
# Elements per [ROWS, BLOCK] tile: 16 fp32 per thread at 8 warps, registers to spare.
ROWS_TILE = 4096


def rows_block(n_cols: int, n_rows: int):
    """(ROWS, BLOCK, num_warps) for programs holding ROWS whole rows of n_cols <= BLOCK classes,
    or None for wide rows (row_block: one program per row, swept in blocks). One row per program
    leaves most lanes of a program idle and launches N tiny programs when C is small."""
    if n_cols > ROWS_MAX_C:
        return None
    block = triton.next_power_of_2(max(n_cols, 1))
    rows = min(max(ROWS_TILE // block, 1), triton.next_power_of_2(max(n_rows, 1)))
    num_warps = 4 if rows * block <= 2048 else 8
    return rows, block, num_warps


# Spatial tiles (inputs (N, C, d1..dk) whose pixels are contiguous): the fewest pixels per image
# for which they are used, and the most pixels per program (blocks of the class sweep hold
# ROWS_TILE elements). Below TILE_MIN_D a program would hold a handful of pixels of one image;
# there the rows kernels take ROWS consecutive pixels (several images) per program instead, and
# a row's classes, D apart, are only a few 32-byte sectors apart.
TILE_MIN_D = 16
TILE_MAX_D = 128


def tile_block(n_cols: int, D: int):
    """(BLOCK_C, BLOCK_D, num_warps) for programs holding BLOCK_D contiguous pixels of one image
    and sweeping its classes BLOCK_C at a time. Each load is then BLOCK_C runs of BLOCK_D
    contiguous values (512 B per run in fp32), where one program per pixel would read its
    classes H*W apart, one 32-byte sector per value."""
    block_d = min(triton.next_power_of_2(max(D, 1)), TILE_MAX_D)
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), max(ROWS_TILE // block_d, 1))
    num_warps = 4 if block_c * block_d <= 2048 else 8
    return block_c, block_d, num_warps


def use_tiles(logits: torch.Tensor, *out: torch.Tensor) -> bool:
    """The spatial tile path: logits [N, C, D] with D >= TILE_MIN_D pixels one element apart
    (as in out, the tensors the kernel writes with the same geometry)."""
    return logits.shape[2] >= TILE_MIN_D and all(t.stride(2) == 1 for t in (logits, *out))


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
    """Fold a block x (masked lanes = -inf) into the running max m and sum s of exp(. - m).
    x is [BLOCK] (one row, m and s scalars) or [BLOCK_C, BLOCK_D] with the classes on axis 0
    (spatial tiles, m and s per pixel: [BLOCK_D])."""
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
def rows_setup(X, stride_xn, stride_xd, D, TARGET, C, ignore_index, n_rows, ROWS: tl.constexpr):
    """row_setup for the ROWS rows of this program (rows_block): (rows, row pointers, targets,
    valid, live), each [ROWS]; live = the row exists (the last program's tail does not)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < n_rows
    n = rows // D
    x_rows = X + n * stride_xn + (rows - n * D) * stride_xd
    y = tl.load(TARGET + rows, mask=live, other=0)
    valid = live & (y != ignore_index) & (y >= 0) & (y < C)
    return rows, x_rows, tl.where(valid, y, 0), valid, live


@triton.jit
def row_stats2d(x_rows, stride_xc, C, y, valid, WEIGHT, HAS_WEIGHT: tl.constexpr,
                SUM_WX: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """row_stats for several rows at once (x_rows, y, valid: [ROWS]), each row whole in one
    block (C <= BLOCK): (lse, nll, q, swx, w_sum), [ROWS] each (w_sum a scalar). The same
    numerics: m = max(x_y, x_j), s = sum_{j != y} exp(x_j - m), row_finish."""
    cols = tl.arange(0, BLOCK)
    inrow = valid[:, None] & (cols < C)[None, :]
    x = tl.load(x_rows[:, None] + (cols.to(tl.int64) * stride_xc)[None, :], mask=inrow,
                other=0.0).to(ACC)
    is_y = cols[None, :] == y[:, None]
    x_y = tl.sum(tl.where(is_y, x, 0.0), 1)  # invalid rows read nothing: x_y = 0
    others = tl.where(inrow & ~is_y, x, float("-inf"))
    m = tl.maximum(x_y, tl.max(others, 1))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # as online_lse_step
    s = tl.sum(tl.exp(others - m_safe[:, None]), 1)
    swx = tl.zeros_like(x_y)
    w_sum = tl.zeros((), ACC)
    if SUM_WX:
        if HAS_WEIGHT:
            w = tl.load(WEIGHT + cols.to(tl.int64), mask=cols < C, other=0.0).to(ACC)
            swx = tl.sum(x * w[None, :], 1)
            w_sum = tl.sum(w, 0)
        else:
            swx = tl.sum(x, 1)
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


@triton.jit
def tile_setup(TARGET, D, C, ignore_index, BLOCK_D: tl.constexpr):
    """This program's BLOCK_D pixels of one image (tile_block; a 1-D grid of N * cdiv(D, BLOCK_D)
    programs, so that N is not bound by a grid axis's 65535): (rows, n, d, targets, valid, live),
    rows, d, targets, valid and live [BLOCK_D], n the image; row = n * D + d as in row_setup.
    Pixel pointers are X + n * stride_xn + d (pixels one element apart)."""
    pid = tl.program_id(0).to(tl.int64)
    per_image = tl.cdiv(D, BLOCK_D)
    n = pid // per_image
    d = (pid - n * per_image) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = d < D
    rows = n * D + d
    y = tl.load(TARGET + rows, mask=live, other=0)
    valid = live & (y != ignore_index) & (y >= 0) & (y < C)
    return rows, n, d, tl.where(valid, y, 0), valid, live


@triton.jit
def tile_stats(x_px, stride_xc, C, y, valid, WEIGHT, HAS_WEIGHT: tl.constexpr,
               SUM_WX: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """row_stats for BLOCK_D pixels at once (x_px: pointers to class 0 of each pixel, y, valid:
    [BLOCK_D]), sweeping the classes in [BLOCK_C, BLOCK_D] blocks with an online max and sum per
    pixel: (lse, nll, q, swx, w_sum), [BLOCK_D] each (w_sum a scalar). The same numerics: m starts
    at x_y, s sums exp(x_j - m) over j != y, row_finish."""
    x_y = tl.load(x_px + y * stride_xc, mask=valid, other=0.0).to(ACC)
    m = x_y  # invalid pixels: 0, and they read nothing
    s = tl.zeros_like(x_y)
    swx = tl.zeros_like(x_y)
    w_sum = tl.zeros((), ACC)
    for off in range(0, C, BLOCK_C):
        cls = off + tl.arange(0, BLOCK_C)
        inb = (cls < C)[:, None] & valid[None, :]
        x = tl.load(x_px[None, :] + (cls.to(tl.int64) * stride_xc)[:, None], mask=inb,
                    other=0.0).to(ACC)
        if SUM_WX:
            if HAS_WEIGHT:
                w = tl.load(WEIGHT + cls.to(tl.int64), mask=cls < C, other=0.0).to(ACC)
                swx += tl.sum(x * w[:, None], 0)
                w_sum += tl.sum(w, 0)
            else:
                swx += tl.sum(x, 0)
        m, s = online_lse_step(m, s, tl.where(inb & (cls[:, None] != y[None, :]), x,
                                              float("-inf")))
    lse, nll, q = row_finish(m, s, x_y)
    return lse, nll, q, swx, w_sum
