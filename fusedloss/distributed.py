"""Vocab-parallel cross-entropy: exact softmax cross-entropy over a vocabulary split across ranks.

Tensor-parallel LM heads shard the logits over the class (last) dimension: rank r of the process
group holds logits [..., V_r] for classes [start_r, start_r + V_r). The loss equals
`cross_entropy` on the gathered logits [N, V] without ever gathering them:

  forward   the fused cross-entropy kernel reads the local shard once and gives each row's local
            lse_r (and, with label smoothing, the row sum); one all-gather of a small packed
            tensor [start_r, V_r | lse_r, x_y if y is local else 0, sum_r, target] per rank gives
            every rank lse = logsumexp_r(lse_r), x_y = sum_r x_y,r, sum_x = sum_r sum_r.
            Row loss: (1-eps)(lse - x_y) + eps/V (V lse - sum_x) + z lse^2, V the GLOBAL vocab.
  backward  no communication: d loss / d x_j = exp(x_j - lse) A - eps/V - (1-eps)[j == y],
            A = 1 + 2 z lse, from the saved global lse, for this rank's columns only.

Every rank returns the same loss; each rank's backward gives the gradient of its own shard
(the collective runs inside an autograd.Function, so no cross-rank term is dropped).
"""
import sys

import torch
import torch.distributed as dist
from torch import nn

from . import _backend
from ._common import (FusedLossTypeError, FusedLossValueError, amp_dtype, check_class_targets,
                      check_same_device, check_tensor, resolve_reduction)
from .cross_entropy import _ce_forward
from .reference import acc_dtype

_FN = "fusedloss.vocab_parallel_cross_entropy"


def _is_dtensor(x) -> bool:
    # Not imported here (it costs 0.4 s): a DTensor exists only once its module is loaded.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # all_gather_single is the newer name of all_gather_into_tensor (deprecated in recent torch).
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _check_gathered(g: torch.Tensor, ignore_index: int) -> None:
    """Eager-mode checks on the gathered [W, 2 + 4N] tensor. Every rank sees the same data, so
    every rank raises together (no rank is left waiting in a collective)."""
    g = g.cpu()  # one read of the (small) gathered tensor
    n = (g.shape[1] - 2) // 4
    spans = sorted((int(s), int(w)) for s, w in g[:, :2].tolist() if w > 0)
    end = 0
    for s, w in spans:
        if s != end:
            raise FusedLossValueError(
                f"{_FN}: the ranks' vocab slices [vocab_start_index, + width) must "
                             f"tile [0, V) without gaps or overlaps; got (start, width) = "
                             f"{[tuple(map(int, r)) for r in g[:, :2].tolist()]}")
        end = s + w
    t_all = g[:, 2 + 3 * n:]
    if bool((t_all != t_all[:1]).any()):
        raise FusedLossValueError(
            f"{_FN}: target differs across the ranks of process_group; every rank "
            f"must pass the same (full) target")
    check_class_targets(_FN, t_all[0].long(), end, ignore_index)


def _assert_gathered(g: torch.Tensor, ignore_index: int) -> None:
    """_check_gathered's checks as one device-side assertion (CUDA): no host read, so no sync per
    call, and it stays in the graph under torch.compile and CUDA-graph capture. A violation makes
    a later synchronising call raise "CUDA error: device-side assert triggered" on every rank."""
    n = (g.shape[1] - 2) // 4
    start, width = g[:, 0], g[:, 1]
    # slices tile [0, V): sorted by start (empty ones last), each starts where the previous ends
    order = torch.argsort(torch.where(width > 0, start, float("inf")))
    s, w = start[order], width[order]
    tiled = ((s == torch.cumsum(w, 0) - w) | (w == 0)).all()
    t_all = g[:, 2 + 3 * n:]
    same = (t_all == t_all[:1]).all()
    t = t_all[0]
    in_range = ((t == ignore_index) | ((t >= 0) & (t < width.sum()))).all()
    torch._assert_async(tiled & same & in_range,
                        f"{_FN}: the ranks' vocab slices must tile [0, V), the target must be the "
                        f"same on every rank and in [0, V) or ignore_index")


def shard_start(width, start, group, dev):
    """This rank's first class: `start` if given, else the exclusive prefix sum of the ranks'
    widths (slices in rank order), from one small all-gather."""
    if start is not None:
        return start
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    widths = torch.empty(world, dtype=torch.int64, device=dev)
    _all_gather(widths, torch.full((1,), width, dtype=torch.int64, device=dev), group)
    return widths[:rank].sum()


def combine_shards(lse_r, x_y, sum_r, t, start, width, group, ignore_index, eps, z):
    """The one packed all-gather of per-row shard statistics and the exact full-vocab row loss.

    lse_r, x_y, sum_r: this rank's per-row lse, target logit (0 if the target is not in the
    slice) and row sum (for smoothing), in the acc dtype; t: [n] int64 global targets.
    Returns (loss [n], lse [n], ok [n] bool, vocab): loss 0 where ok is False (ignored rows, and
    out-of-range targets when the eager check is skipped), in the acc dtype.
    """
    world, dev, acc, f64 = dist.get_world_size(group), lse_r.device, lse_r.dtype, torch.float64
    n = t.numel()
    valid = t != ignore_index
    # fp64 keeps start, width and target exact whatever the vocab size.
    start_t = (start.to(f64) if torch.is_tensor(start)
               else torch.full((), start, dtype=f64, device=dev))
    head = torch.stack([start_t, torch.full((), width, dtype=f64, device=dev)])
    packed = torch.cat([head, torch.stack([lse_r, x_y, sum_r]).to(f64).view(-1), t.to(f64)])
    g = torch.empty(world * packed.numel(), dtype=f64, device=dev)  # flat: gloo wants cat form
    _all_gather(g, packed, group)
    g = g.view(world, packed.numel())
    if g.device.type == "cuda":
        _assert_gathered(g, ignore_index)
    elif _backend.eager_checks_enabled(t):
        _check_gathered(g, ignore_index)

    vocab = g[:, 1].sum()
    lse_all, xy_all, sum_all = g[:, 2:2 + 3 * n].view(world, 3, n).unbind(1)
    lse = torch.logsumexp(lse_all, 0)
    loss = (1 - eps) * (lse - xy_all.sum(0)) + z * lse * lse
    if eps:
        loss = loss + eps * (lse - sum_all.sum(0) / vocab)
    # Rows with a target outside [0, V) (only when the eager check is skipped) count 0,
    # as in cross_entropy.
    ok = valid & (t >= 0) & (t < vocab)
    loss = torch.where(ok, loss, 0.0).to(acc)
    return loss, lse, ok, vocab


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, group, start, ignore_index, eps, z, reduction):
        dev, acc = x.device, acc_dtype(x.dtype)
        t = target.reshape(-1).long()
        n, width = t.numel(), x.shape[-1]
        x2 = x.reshape(n, width)
        start = shard_start(width, start, group, dev)
        valid = t != ignore_index
        local = t - start
        in_slice = valid & (local >= 0) & (local < width)
        t_loc = local.clamp(0, max(width - 1, 0))
        if width > 0:
            # ignore_index -1 never matches t_loc >= 0: the kernel computes every row's lse.
            # With eps = 1 its row loss is lse_r - sum_r / V_r, which gives the row sum in the
            # same single read of the shard (only asked for when label smoothing needs it).
            loss_k, lse_r = _ce_forward(x2.unsqueeze(-1), t_loc, None, -1,
                                        1.0 if eps else 0.0, 0.0, check_targets=False)
            sum_r = width * (lse_r - loss_k) if eps else torch.zeros_like(lse_r)
            x_y = torch.where(in_slice, x2.gather(1, t_loc[:, None])[:, 0].to(acc), 0.0)
        else:  # an empty shard: contributes nothing (exp(-inf) = 0)
            lse_r = torch.full((n,), -float("inf"), dtype=acc, device=dev)
            sum_r = x_y = torch.zeros(n, dtype=acc, device=dev)
        loss, lse, ok, vocab = combine_shards(lse_r, x_y, sum_r, t, start, width, group,
                                              ignore_index, eps, z)
        scale = None
        if reduction == "none":
            out = loss.view(target.shape)
        elif reduction == "sum":
            out = loss.sum()
        else:
            scale = valid.sum(dtype=acc).reciprocal()  # a device tensor: no host sync
            out = loss.sum() * scale
        ctx.save_for_backward(x, lse.to(acc), t_loc, in_slice, ok, vocab.to(acc), scale)
        ctx.eps, ctx.z, ctx.reduction = eps, z, reduction
        return out.to(amp_dtype(x))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, lse, t_loc, in_slice, ok, vocab, scale = ctx.saved_tensors
        n, width = t_loc.numel(), x.shape[-1]
        if width == 0:
            return torch.zeros_like(x), None, None, None, None, None, None, None
        x2 = x.reshape(n, width)
        row = grad_out.reshape(-1) if ctx.reduction == "none" else grad_out.expand(n)
        row = row.to(lse.dtype)
        if scale is not None:
            row = row * scale
        # where, not a product: ignored rows get 0 even when scale is inf (all rows ignored).
        row = torch.where(ok, row, 0.0)
        args = (lse, t_loc, in_slice, row, vocab, ctx.eps, ctx.z)
        if x.dtype == lse.dtype or n == 0:  # the acc-dtype buffer is the gradient itself
            grad = shard_grad(x2, slice(None), *args).to(x.dtype)
        else:  # fp16 / bf16: in row blocks, so that the fp32 temporary stays small
            grad = torch.empty(n, width, dtype=x.dtype, device=x.device)
            step = max(1, _BLOCK_ELEMS // width)
            for r in range(0, n, step):
                grad[r:r + step] = shard_grad(x2, slice(r, r + step), *args)
        return grad.reshape(x.shape), None, None, None, None, None, None, None


_BLOCK_ELEMS = 1 << 22  # fp32 elements of the backward's temporary for fp16 / bf16 logits


def shard_grad(x2, rows, lse, t_loc, in_slice, row, vocab, eps, z):
    """Gradient of the given rows of the shard, in lse's (acc) dtype:
    row * (exp(x - lse) (1 + 2 z lse) - eps/V - (1 - eps)[j == y])."""
    lse = lse[rows]
    g = torch.sub(x2[rows], lse[:, None])  # promotes to lse's dtype: a new buffer, updated in place
    g.exp_().mul_((1 + 2 * z * lse)[:, None])
    if eps:
        g.sub_(eps / vocab)
    g.scatter_add_(1, t_loc[rows, None], (in_slice[rows].to(g.dtype) * (eps - 1.0))[:, None])
    return g.mul_(row[rows, None])


def vocab_parallel_cross_entropy(logits_shard, target, process_group=None, vocab_start_index=None,
                                 ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                 z_loss=0.0):
    """Cross-entropy over a vocabulary sharded across the ranks of `process_group`.

    logits_shard: [..., V_r], this rank's slice of the class (last) dimension (any float dtype);
      or a DTensor on a 1-D mesh sharded on its last dimension (then the mesh's group is used).
    target: [...] int64 (or uint8) class indices into the FULL vocabulary, the same on every rank.
    process_group: default the world group.
    vocab_start_index: first class of this rank's slice. Default: slices in rank order, i.e. the
      exclusive prefix sum of the shard widths, found with one extra small all-gather per call
      (pass it to save that collective). Uneven and empty shards are allowed.
    ignore_index, reduction, label_smoothing: as torch.nn.functional.cross_entropy (the smoothing
      spreads over the GLOBAL vocab V); z_loss: s * lse^2 per non-ignored row, as in cross_entropy.
    Returns on every rank the loss of cross_entropy(full_logits.view(-1, V), target.view(-1)) (shape
    target.shape for reduction='none'), in the logits' dtype; backward gives each rank the gradient
    of its shard, with no communication.

    Checks that read device data (targets in range and equal on all ranks, slices tiling [0, V))
    run in eager mode after the all-gather, so all ranks raise together; they are skipped under
    torch.compile / CUDA-graph capture, where out-of-range targets then contribute 0.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_FN} needs an initialised torch.distributed process group "
                           f"(dist.init_process_group)")
    if _is_dtensor(logits_shard):
        mesh, placements = logits_shard.device_mesh, logits_shard.placements
        if mesh.ndim != 1 or not placements[0].is_shard(logits_shard.dim() - 1):
            raise FusedLossValueError(
                f"logits_shard as a DTensor must be sharded on its last dimension "
                f"over a 1-D mesh, got {placements} on a {mesh.ndim}-D mesh")
        if process_group is not None or vocab_start_index is not None:
            raise FusedLossValueError(
                "process_group and vocab_start_index come from the DTensor's mesh; "
                "leave them None")
        process_group = mesh.get_group()
        logits_shard = logits_shard.to_local()  # differentiable: the gradient comes back sharded
        if _is_dtensor(target):
            if not all(p.is_replicate() for p in target.placements):
                raise FusedLossValueError(
                    f"target as a DTensor must be replicated, got {target.placements}")
            target = target.to_local()
    reduction = resolve_reduction(reduction)
    check_tensor("logits_shard", logits_shard)
    check_tensor("target", target, floating=False)
    if logits_shard.dim() == 0:
        raise FusedLossValueError(
            "logits_shard must have shape (..., V_r), the vocab last; got a scalar")
    if target.dtype not in (torch.int64, torch.uint8):
        raise FusedLossTypeError(
            f"target must hold int64 (or uint8) class indices, got {target.dtype}")
    if target.shape != logits_shard.shape[:-1]:
        raise FusedLossValueError(f"target must have shape {tuple(logits_shard.shape[:-1])} for "
                                  f"logits_shard of shape {tuple(logits_shard.shape)}, got "
                                  f"{tuple(target.shape)}")
    check_same_device("logits_shard", logits_shard, target=target)
    if process_group is not None and dist.get_rank(process_group) < 0:
        raise FusedLossValueError("this rank is not a member of process_group")
    if vocab_start_index is not None and (isinstance(vocab_start_index, bool)
                                          or not isinstance(vocab_start_index, int)
                                          or vocab_start_index < 0):
        raise FusedLossValueError(f"vocab_start_index must be a non-negative int or None, "
                                  f"got {vocab_start_index!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise FusedLossValueError(
            f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not z_loss >= 0.0:
        raise FusedLossValueError(f"z_loss must be >= 0, got {z_loss}")
    return _VocabParallelCrossEntropy.apply(logits_shard, target, process_group, vocab_start_index,
                                            int(ignore_index), float(label_smoothing),
                                            float(z_loss), reduction)


class VocabParallelCrossEntropyLoss(nn.Module):
    """Module form of vocab_parallel_cross_entropy: holds the options, calls the functional."""

    def __init__(self, process_group=None, vocab_start_index=None, ignore_index=-100,
                 reduction="mean", label_smoothing=0.0, z_loss=0.0):
        super().__init__()
        self.process_group = process_group
        self.vocab_start_index = vocab_start_index
        self.ignore_index = ignore_index
        self.reduction = resolve_reduction(reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    def forward(self, logits_shard: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(
            logits_shard, target, process_group=self.process_group,
            vocab_start_index=self.vocab_start_index, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss)

    def extra_repr(self) -> str:
        s = f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        if self.vocab_start_index is not None:
            s += f", vocab_start_index={self.vocab_start_index}"
        if self.label_smoothing:
            s += f", label_smoothing={self.label_smoothing}"
        if self.z_loss:
            s += f", z_loss={self.z_loss}"
        return s
