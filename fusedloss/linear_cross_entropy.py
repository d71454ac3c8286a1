"""Linear + cross-entropy for LM heads: a drop-in for torch.nn.functional.linear_cross_entropy
that never holds the [N, V] logits nor their gradient.

Blocked over tokens (csrc/linear_cross_entropy.cpp on the CPU; `_blocked` below with cuBLAS and
the Triton cross-entropy kernels on CUDA): per block of rows, logits = x W^T (+ b) into one reused
buffer, the fused cross-entropy kernel gives (loss, lse), and where the gradient's per-row scale
is known in forward its kernel overwrites the block with dlogits, which two GEMMs turn into the
block's rows of grad_input and a term of grad_weight.

GEMMs per forward + backward (eager linear + cross_entropy does 3):
  mean / sum   3: all gradients are formed in forward (scaled by 1 / sum of weights for mean);
               backward only multiplies them by the scalar grad_output.
  'none'       4: the per-row grad_output is unknown in forward, so forward keeps nothing but the
               inputs and backward recomputes each block's logits (1 + 2 GEMMs).
  no grad      1: only the logits GEMM.
Vocab-parallel (process_group=): 4, see _VocabParallelLinearCrossEntropy.

Memory beyond the inputs and the returned gradients: the [block_rows, V] logits block in the
input's dtype (default: rows for BLOCK_BYTES = 32 MiB), plus an fp32 [V] bias-gradient accumulator.
"""
import contextlib

import torch
from torch import nn

from . import _backend
from ._common import (FusedLossValueError, check_class_targets_for, check_same_device,
                      check_tensor, class_weight_sum, resolve_reduction)
from .reference import acc_dtype

_FN = "fusedloss.linear_cross_entropy"
BLOCK_BYTES = 32 * 2**20  # default size of the logits block

if _backend.HAS_TRITON:
    from fusedloss.kernels import cross_entropy as _tk
else:
    _tk = None


def default_block_rows(n_classes: int, dtype: torch.dtype) -> int:
    """Rows per block so that the [rows, V] logits block holds at most BLOCK_BYTES."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, BLOCK_BYTES // max(1, n_classes * itemsize))


def _blocked(ce, input, linear_weight, linear_bias, target, weight, grad_scale, ignore_index,
             label_smoothing, z_loss, block_rows, need_input, need_weight, need_bias):
    """The blocked scheme of csrc/linear_cross_entropy.cpp in Python, with torch.mm (cuBLAS on
    CUDA) and a cross-entropy module `ce` (the Triton launchers or fusedloss.reference) that has
    cross_entropy_fwd / cross_entropy_bwd_inplace. Same contract as the op."""
    n, d = input.shape
    v = linear_weight.shape[0]
    acc = acc_dtype(input.dtype)
    grads = grad_scale is not None
    need_input, need_weight = grads and need_input, grads and need_weight
    need_bias = grads and need_bias and linear_bias is not None
    loss = input.new_empty(n, dtype=acc)
    gi = input.new_empty((n, d) if need_input else (0, 0))
    gw = input.new_zeros((v, d)) if need_weight else input.new_empty((0, 0))
    gb = input.new_zeros(v, dtype=acc) if need_bias else None
    rows = min(block_rows, n)
    buf = input.new_empty(rows, v)
    wt = linear_weight.t()
    for r in range(0, n, max(rows, 1)):
        nb = min(rows, n - r)
        x_blk = input[r:r + nb]
        logits = buf[:nb]
        if linear_bias is not None:
            torch.addmm(linear_bias, x_blk, wt, out=logits)
        else:
            torch.mm(x_blk, wt, out=logits)
        t_blk = target[r:r + nb]
        l3 = logits.unsqueeze(-1)
        loss_blk, lse_blk = ce.cross_entropy_fwd(l3, t_blk, weight, ignore_index,
                                                 label_smoothing, z_loss)
        loss[r:r + nb] = loss_blk
        if not (need_input or need_weight or need_bias):
            continue
        scale = grad_scale if grad_scale.numel() == 1 else grad_scale[r:r + nb]
        # (the Triton launchers run under the logits' device themselves: device_guard)
        ce.cross_entropy_bwd_inplace(scale, l3, t_blk, lse_blk, weight, ignore_index,
                                     label_smoothing, z_loss)
        if need_input:
            torch.mm(logits, linear_weight, out=gi[r:r + nb])
        if need_weight:
            gw.addmm_(logits.t(), x_blk)
        if need_bias:
            gb += logits.sum(0, dtype=acc)
    gb = gb.to(linear_bias.dtype) if need_bias else input.new_empty(0)
    return loss, gi, gw, gb


def _triton_op(*args):
    return _blocked(_tk, *args)


if _backend.HAS_CPP:

    @torch.library.register_fake("fusedloss::linear_cross_entropy")
    def _fake(input, linear_weight, linear_bias, target, weight, grad_scale, ignore_index,
              label_smoothing, z_loss, block_rows, need_input, need_weight, need_bias):
        n, d = input.shape
        v = linear_weight.shape[0]
        grads = grad_scale is not None
        loss = input.new_empty(n, dtype=acc_dtype(input.dtype))
        gi = input.new_empty((n, d) if grads and need_input else (0, 0))
        gw = input.new_empty((v, d) if grads and need_weight else (0, 0))
        has_gb = grads and need_bias and linear_bias is not None
        gb = input.new_empty(v if has_gb else 0, dtype=linear_bias.dtype if has_gb else None)
        return loss, gi, gw, gb

    if _tk is not None:
        _backend.register_triton("linear_cross_entropy", _triton_op)


def _run(x, *args):
    """The op for x's backend: the registered op (C++ on CPU, Triton + cuBLAS on CUDA), the
    Triton launchers directly, or the plain-PyTorch reference cross-entropy in the same blocks."""
    be = _backend.backend_for(x)
    if be == "op":
        return torch.ops.fusedloss.linear_cross_entropy(x, *args)
    if be == "triton":
        return _blocked(_tk, x, *args)
    from . import reference

    return _blocked(reference, x, *args)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lw, lb, t, w, ignore_index, eps, z, reduction, block_rows, grad_on,
                out_dtype):
        acc = acc_dtype(x.dtype)
        need = [grad_on and ctx.needs_input_grad[i] for i in range(3)]
        need[2] = need[2] and lb is not None
        opts = (ignore_index, eps, z, block_rows)
        denom = None
        if reduction == "mean":
            denom = class_weight_sum(t, w, ignore_index, lw.shape[0], acc)
        ctx.reduction, ctx.opts, ctx.need, ctx.consumed = reduction, opts, need, False
        if reduction != "none" and any(need):
            # The gradient of sum (or mean) is known up to the scalar grad_output: form it now.
            scale = (denom.reciprocal() if denom is not None else x.new_ones((), dtype=acc))
            loss, gi, gw, gb = _run(x, lw, lb, t, w, scale.reshape(1), *opts, *need)
            # The inputs too (references, no copies): a second backward (retain_graph,
            # gradcheck) recomputes, since the first one scales gi, gw, gb in place (held on
            # ctx, not saved: saved tensors may not change before they are unpacked).
            ctx.save_for_backward(x, lw, lb, t, w, scale)
            ctx.grads = (gi, gw, gb)
        else:
            loss = _run(x, lw, lb, t, w, None, *opts, False, False, False)[0]
            if any(need):  # 'none': backward recomputes the blocks with the per-row grad_output
                ctx.save_for_backward(x, lw, lb, t, w)
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / denom
        return out.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            g = grad_out.reshape(())
            if not ctx.consumed:
                # The forward's buffers become the gradients: scaled in place, no second copy.
                ctx.consumed = True
                gi, gw, gb = (b.mul_(g.to(b.dtype)) for b in ctx.grads)
                ctx.grads = None
            else:  # a second backward through this call: recompute (3 GEMMs)
                x, lw, lb, t, w, scale = ctx.saved_tensors
                scale = (scale * g.to(scale.dtype)).reshape(1)
                _, gi, gw, gb = _run(x, lw, lb, t, w, scale, *ctx.opts, *ctx.need)
        else:
            x, lw, lb, t, w = ctx.saved_tensors
            scale = grad_out.reshape(-1).to(acc_dtype(x.dtype)).contiguous()
            _, gi, gw, gb = _run(x, lw, lb, t, w, scale, *ctx.opts, *ctx.need)
        gi, gw, gb = (b if need else None for b, need in zip((gi, gw, gb), ctx.need))
        return gi, gw, gb, None, None, None, None, None, None, None, None, None


def _check_group(group, start):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_FN}: process_group needs an initialised torch.distributed "
                           f"process group (dist.init_process_group)")
    if dist.get_rank(group) < 0:
        raise FusedLossValueError("this rank is not a member of process_group")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise FusedLossValueError(f"vocab_start_index must be a non-negative int or None, got {start!r}")


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Vocab-parallel head: this rank holds rows [start, start + V_r) of linear_weight (and
    linear_bias); input and target are the same on every rank.

    forward   per block: logits = x W_r^T (+ b_r) (GEMM 1) and the cross-entropy kernel's local
              lse (and row sum for smoothing), the target logit where the target is local; then
              fusedloss.distributed's one packed all-gather gives the exact full-vocab loss.
    backward  recomputes each block's logits (GEMM 1 again: the gradient needs the GLOBAL lse,
              known only after every block's forward), dlogits from it, then GEMMs 2 and 3 into
              grad_input (partial: this rank's classes only) and grad_weight / grad_bias of the
              local slice. The only collective: an all-reduce (sum) of grad_input over the group
              when reduce_grad_input (the exact gradient of the replicated input on every rank).
    4 GEMMs per forward + backward; the logits block and its fp32 gradient are the only [*, V_r]
    memory.
    """

    @staticmethod
    def forward(ctx, x, lw, lb, t, group, start, ignore_index, eps, z, reduction, block_rows,
                reduce_gi, out_dtype):
        from .distributed import combine_shards, shard_start

        dev, acc = x.device, acc_dtype(x.dtype)
        n, width = t.numel(), lw.shape[0]
        start = shard_start(width, start, group, dev)
        valid = t != ignore_index
        local = t - start
        in_slice = valid & (local >= 0) & (local < width)
        t_loc = local.clamp(0, max(width - 1, 0))
        lse_r = torch.full((n,), -float("inf"), dtype=acc, device=dev)  # empty shard: exp(-inf) = 0
        sum_r, x_y = torch.zeros(n, dtype=acc, device=dev), torch.zeros(n, dtype=acc, device=dev)
        if width > 0:
            ce_fwd = _backend.impl(_backend.backend_for(x), _tk, "cross_entropy_fwd")
            for r, nb, x_blk, logits in _logit_blocks(x, lw, lb, block_rows):
                tl_blk = t_loc[r:r + nb]
                # ignore_index -1 never matches t_loc >= 0: every row's lse. With eps = 1 the
                # kernel's row loss is lse_r - sum_r / V_r: the row sum in the same read.
                loss_k, lse_k = ce_fwd(logits.unsqueeze(-1), tl_blk, None, -1,
                                       1.0 if eps else 0.0, 0.0)
                lse_r[r:r + nb] = lse_k
                if eps:
                    sum_r[r:r + nb] = width * (lse_k - loss_k)
                x_y[r:r + nb] = torch.where(in_slice[r:r + nb],
                                            logits.gather(1, tl_blk[:, None])[:, 0].to(acc), 0.0)
        loss, lse, ok, vocab = combine_shards(lse_r, x_y, sum_r, t, start, width, group,
                                              ignore_index, eps, z)
        scale = None
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:
            scale = valid.sum(dtype=acc).reciprocal()  # a device tensor: no host sync
            out = loss.sum() * scale
        ctx.save_for_backward(x, lw, lb, lse.to(acc), t_loc, in_slice, ok, vocab.to(acc), scale)
        ctx.opts = (group, eps, z, reduction, block_rows, reduce_gi)
        return out.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        import torch.distributed as dist

        from .distributed import shard_grad

        x, lw, lb, lse, t_loc, in_slice, ok, vocab, scale = ctx.saved_tensors
        group, eps, z, reduction, block_rows, reduce_gi = ctx.opts
        n = t_loc.numel()
        row = grad_out.reshape(-1) if reduction == "none" else grad_out.reshape(1).expand(n)
        row = row.to(lse.dtype)
        if scale is not None:
            row = row * scale
        row = torch.where(ok, row, 0.0)  # ignored rows 0 even when scale is inf (all ignored)
        gi = torch.zeros_like(x, memory_format=torch.contiguous_format)
        gw = torch.zeros_like(lw) if ctx.needs_input_grad[1] else None
        gb = torch.zeros_like(lb, dtype=lse.dtype) if lb is not None and ctx.needs_input_grad[2] \
            else None
        if lw.shape[0] > 0:
            for r, nb, x_blk, logits in _logit_blocks(x, lw, lb, block_rows):
                s = slice(r, r + nb)
                g = shard_grad(logits, slice(None), lse[s], t_loc[s], in_slice[s], row[s], vocab,
                               eps, z).to(x.dtype)
                torch.mm(g, lw, out=gi[s])
                if gw is not None:
                    gw.addmm_(g.t(), x_blk)
                if gb is not None:
                    gb += g.sum(0, dtype=gb.dtype)
        if reduce_gi and ctx.needs_input_grad[0]:
            dist.all_reduce(gi, group=group)
        gb = None if gb is None else gb.to(lb.dtype)
        return (gi if ctx.needs_input_grad[0] else None, gw, gb, None, None, None, None, None,
                None, None, None, None, None)


def _logit_blocks(x, lw, lb, block_rows):
    """(first row, rows, input rows, logits) per block of rows; the logits in one reused buffer."""
    n = x.shape[0]
    rows = max(1, min(block_rows, n))
    buf = x.new_empty(min(rows, n), lw.shape[0])
    for r in range(0, n, rows):
        nb = min(rows, n - r)
        x_blk, logits = x[r:r + nb], buf[:nb]
        if lb is not None:
            torch.addmm(lb, x_blk, lw.t(), out=logits)
        else:
            torch.mm(x_blk, lw.t(), out=logits)
        yield r, nb, x_blk, logits


def _check_options(reduction, label_smoothing, z_loss, block_rows):
    reduction = resolve_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise FusedLossValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not z_loss >= 0.0:
        raise FusedLossValueError(f"z_loss must be >= 0, got {z_loss}")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int)
                                   or block_rows < 1):
        raise FusedLossValueError(f"block_rows must be a positive int or None, got {block_rows!r}")
    return reduction


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0, options=None,
                         z_loss=0.0, block_rows=None, process_group=None, vocab_start_index=None,
                         reduce_grad_input=True):
    """torch.nn.functional.linear_cross_entropy (torch 2.13), fused: the value and gradients of
    cross_entropy(linear(input, linear_weight, linear_bias), target, ...) without the logits.

    Same arguments, defaults and semantics: input (D,) or (N, D) (and, an extension, any
    (..., D) with target (...)), linear_weight (V, D), linear_bias (V,), class-index target,
    ignore_index None meaning -100 for class indices. `options` (torch's
    LinearCrossEntropyOptions) is accepted; the blocked path is always on, and its
    batch_chunk_size, if set, is the block's row count unless block_rows is given.
    Probability targets and K-dimensional weights (V, d1, ..., dK, D) take a plain path
    (linear + fusedloss cross_entropy) that does hold the logits.

    Extras (keyword-only):
      z_loss: s * logsumexp(row)^2 per non-ignored row, reduced like the loss (as cross_entropy).
      block_rows: rows per logits block (default: a 32 MiB block).
      process_group, vocab_start_index: vocab-parallel head. linear_weight (and linear_bias) are
        this rank's rows [vocab_start_index, + V_r) of the head; input and target are the same
        on every rank; the loss is exact over the full vocabulary (one packed all-gather), and
        the logits exist on no rank. Class weights are not supported there.
      reduce_grad_input: vocab-parallel only. Each rank's logits give a partial gradient of
        input; True (default) all-reduces it over process_group in backward, so every rank gets
        the full gradient. Pass False when the caller's layer does that (as Megatron's
        column-parallel head does in its copy_to_tensor_model_parallel_region backward).
    Under torch.autocast the GEMMs run in the autocast dtype and the loss is returned in fp32,
    as linear + cross_entropy do there.
    """
    check_tensor("input", input)
    check_tensor("linear_weight", linear_weight)
    check_tensor("target", target, floating=False)
    reduction = _check_options(reduction, label_smoothing, z_loss, block_rows)
    if input.dim() < 1:
        raise RuntimeError(f"{_FN}: expected input with dimensionality at least 1, got a scalar")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"{_FN}: expected linear_weight with dimensionality at least 2, "
                           f"got {linear_weight.dim()}")
    d = input.shape[-1]
    if linear_weight.shape[-1] != d:
        raise RuntimeError(f"{_FN}: expected equal input and linear_weight last dimensions "
                           f"(in_features), got {d} and {linear_weight.shape[-1]}, respectively")
    n_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None:
        check_tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (n_classes, *out_features):
            raise RuntimeError(f"{_FN}: expected linear_bias shape {(n_classes, *out_features)}, "
                               f"got {tuple(linear_bias.shape)}")
    if weight is not None:
        check_tensor("weight", weight)
        if weight.dim() != 1 or weight.numel() != n_classes:
            raise FusedLossValueError(f"{_FN}: weight must have shape ({n_classes},) (one per class of "
                             f"linear_weight), got {tuple(weight.shape)}")
    check_same_device("input", input, linear_weight=linear_weight, linear_bias=linear_bias,
                      target=target, weight=weight)
    autocast = torch.is_autocast_enabled(input.device.type)
    if not autocast:
        for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
            if t is not None and t.dtype != input.dtype:
                raise RuntimeError(f"{_FN}: {name} has dtype {t.dtype} but input has "
                                   f"{input.dtype}; they must match (as in F.linear)")

    probs = target.is_floating_point()
    if probs and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    if out_features or probs:
        if process_group is not None:
            raise FusedLossValueError(f"{_FN}: process_group needs class-index targets and a 2-d "
                             f"linear_weight")
        return _plain(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                      label_smoothing, z_loss, out_features, probs)

    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"{_FN}: target must hold int64 (or uint8) class indices or "
                           f"floating-point probabilities, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise RuntimeError(f"{_FN}: target must have shape {tuple(input.shape[:-1])} for input "
                           f"of shape {tuple(input.shape)}, got {tuple(target.shape)}")

    out_dtype = input.dtype
    if autocast:  # linear runs in the autocast dtype, cross_entropy in fp32
        dt = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(dt), linear_weight.to(dt)
        linear_bias = None if linear_bias is None else linear_bias.to(dt)
        out_dtype = torch.float32
    x2 = input.reshape(-1, d)
    t = target.reshape(-1).long().contiguous()
    acc = acc_dtype(x2.dtype)
    if block_rows is None and getattr(options, "batch_chunk_size", None):
        block_rows = int(options.batch_chunk_size)  # torch's chunk size, when one is set
    rows = block_rows or default_block_rows(n_classes, x2.dtype)
    grad_on = torch.is_grad_enabled()
    with torch.autocast(input.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if process_group is not None:
            if weight is not None:
                raise FusedLossValueError(f"{_FN}: class weights are not supported with process_group")
            _check_group(process_group, vocab_start_index)
            out = _VocabParallelLinearCrossEntropy.apply(
                x2, linear_weight, linear_bias, t, process_group, vocab_start_index,
                ignore_index, float(label_smoothing), float(z_loss), reduction, rows,
                bool(reduce_grad_input), out_dtype)
        else:
            w = None if weight is None else weight.to(acc).contiguous()
            check_class_targets_for(_FN, _backend.backend_for(x2), x2, t, n_classes,
                                    ignore_index)
            out = _LinearCrossEntropy.apply(x2, linear_weight, linear_bias, t, w, ignore_index,
                                            float(label_smoothing), float(z_loss), reduction,
                                            rows, grad_on, out_dtype)
    return out.view(target.shape) if reduction == "none" else out


def _plain(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
           label_smoothing, z_loss, out_features, probs):
    """Probability targets and K-dimensional heads: linear + fusedloss cross_entropy, as torch's
    reference path (this one holds the logits)."""
    from .cross_entropy import cross_entropy

    n_classes, d = linear_weight.shape[0], linear_weight.shape[-1]
    if out_features and input.dim() != 2:
        raise RuntimeError(f"{_FN}: K-dimensional loss defined by linear_weight shape "
                           f"{tuple(linear_weight.shape)} requires batched input (N, {d}), got "
                           f"input with shape {tuple(input.shape)}")
    flat = n_classes
    for f in out_features:
        flat *= f
    logits = torch.nn.functional.linear(
        input, linear_weight.reshape(flat, d),
        None if linear_bias is None else linear_bias.reshape(flat))
    logits = logits.reshape(*input.shape[:-1], n_classes, *out_features)
    return cross_entropy(logits, target, weight=weight, reduction=reduction,
                         ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)


class LinearCrossEntropy(nn.Module):
    """linear_cross_entropy as a loss that takes the head's weight per call, as LM code is
    written (the head is owned by the model, often tied to the embedding):

        loss_fn = fusedloss.LinearCrossEntropy(ignore_index=-100)
        loss = loss_fn(hidden, model.lm_head.weight, labels)   # hidden [B, T, D], labels [B, T]

    Holds the options only; forward(input, linear_weight, target, linear_bias=None).
    """

    def __init__(self, weight=None, ignore_index=None, reduction="mean", label_smoothing=0.0,
                 *, z_loss=0.0, block_rows=None, process_group=None, vocab_start_index=None,
                 reduce_grad_input=True):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _check_options(reduction, label_smoothing, z_loss, block_rows)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.block_rows = block_rows
        self.process_group = process_group
        self.vocab_start_index = vocab_start_index
        self.reduce_grad_input = reduce_grad_input

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, block_rows=self.block_rows,
            process_group=self.process_group, vocab_start_index=self.vocab_start_index,
            reduce_grad_input=self.reduce_grad_input)

    def extra_repr(self) -> str:
        s = f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        if self.label_smoothing:
            s += f", label_smoothing={self.label_smoothing}"
        if self.z_loss:
            s += f", z_loss={self.z_loss}"
        if self.block_rows:
            s += f", block_rows={self.block_rows}"
        return s


class LinearCrossEntropyLoss(nn.Module):
    """torch.nn.LinearCrossEntropyLoss (torch 2.13), fused: owns its `linear` (nn.Linear of
    in_features -> num_classes * prod(out_features)); same constructor, attributes and forward,
    so swapping torch's class for this one is one line. Extras keyword-only: z_loss, block_rows.
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None,
                 dtype=None, reduction="mean", weight=None, ignore_index=None,
                 label_smoothing=0.0, options=None, z_loss=0.0, block_rows=None):
        super().__init__()
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, "
                               f"got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], "
                               f"got {label_smoothing}")
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.reduction = _check_options(reduction, label_smoothing, z_loss, block_rows)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.block_rows = block_rows
        flat = num_classes
        for f in self.out_features:
            flat *= f
        self.linear = nn.Linear(in_features, flat, bias=bias, device=device, dtype=dtype)

    def forward(self, input, target):
        lw = self.linear.weight.reshape(self.num_classes, *self.out_features,
                                        self.linear.in_features)
        lb = (None if self.linear.bias is None
              else self.linear.bias.reshape(self.num_classes, *self.out_features))
        return linear_cross_entropy(
            input, lw, target, linear_bias=lb, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            options=self.options, z_loss=self.z_loss, block_rows=self.block_rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}")
