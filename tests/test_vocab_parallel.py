"""Vocab-parallel cross-entropy on 2, 3 and 4 gloo processes (CPU), each rank holding a slice of the
vocab, against float64 F.cross_entropy on the full logits: loss and each shard's gradient, and the
number of collectives in forward and backward.

One spawned job per world size runs every case (spawning costs seconds, a case milliseconds).
A failure on any rank makes torch.multiprocessing.spawn stop the others and raise here.
"""
import contextlib
import datetime
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fusedloss
from fusedloss import _backend
from fusedloss.functional import vocab_parallel_cross_entropy

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
# Every torch.distributed entry point that communicates: counted, whichever the code uses.
COMM = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
        "_all_gather_base", "all_gather_object", "all_gather_coalesced", "all_reduce_coalesced",
        "reduce", "broadcast", "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor",
        "reduce_scatter_single", "_reduce_scatter_base", "all_to_all", "all_to_all_single", "send",
        "recv", "isend", "irecv", "batch_isend_irecv", "barrier", "broadcast_object_list")


@contextlib.contextmanager
def count_collectives():
    """Wrap every torch.distributed collective; yields a list that grows by one name per call."""
    calls, saved = [], {}
    for name in COMM:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls.append(_name)
            return _fn(*a, **k)

        setattr(dist, name, wrapped)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def reference(full, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """float64 F.cross_entropy on the full logits (rows [-1, V]) plus the z-loss term by hand."""
    x = full.double().reshape(-1, full.shape[-1])
    t = target.reshape(-1)
    loss = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = t != ignore_index
    loss = loss + torch.where(valid, z_loss * torch.logsumexp(x, 1).square(), 0.0)
    if reduction == "none":
        return loss.view(target.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def close(actual, expected, atol):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * max(1.0, scale), rtol=atol,
                               equal_nan=True)


def run_case(widths, shape=(6,), dtype=torch.float32, reduction="mean", ignore_index=-100,
             n_ignored=2, label_smoothing=0.0, z_loss=0.0, pass_start=False, group=None, seed=0,
             module=False, backend="", noncontig=False, block=None):
    """One case on this rank: inputs built from the same seed on every rank; rank r holds
    columns [sum(widths[:r]), + widths[r]) of the full logits."""
    rank = dist.get_rank(group)
    gen = torch.Generator().manual_seed(seed)
    vocab = sum(widths)
    full = (torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = ignore_index
    start = sum(widths[:rank])
    shard = full[..., start:start + widths[rank]].clone()
    if noncontig:  # vocab not the fastest-moving dim: the kernel reads strided rows
        shard = shard.movedim(-1, 0).contiguous().movedim(0, -1)
        assert widths[rank] < 2 or not shard.is_contiguous()
    shard.requires_grad_(True)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
              z_loss=z_loss)
    fn = (fusedloss.VocabParallelCrossEntropyLoss(group, start if pass_start else None, **kw)
          if module else
          lambda x, t: vocab_parallel_cross_entropy(x, t, process_group=group,
                                                    vocab_start_index=start if pass_start
                                                    else None, **kw))
    saved = _backend._ENV, fusedloss.distributed._BLOCK_ELEMS
    _backend._ENV = backend
    if block:  # rows per backward block for fp16 / bf16 = block // width
        fusedloss.distributed._BLOCK_ELEMS = block
    try:
        with count_collectives() as fwd_calls:
            out = fn(shard, target)
        ref_x = full.double().requires_grad_(True)
        ref = reference(ref_x, target, **kw)
        assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
        close(out, ref.detach(), ATOL[dtype])
        # The packed all-gather, plus the widths' all-gather when the start is not given.
        assert len(fwd_calls) == (1 if pass_start else 2), fwd_calls
        assert set(fwd_calls) <= {"all_gather_single", "all_gather_into_tensor"}, fwd_calls
        go = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        with count_collectives() as bwd_calls:
            out.backward(go.to(dtype))
        assert bwd_calls == [], bwd_calls
    finally:
        _backend._ENV, fusedloss.distributed._BLOCK_ELEMS = saved
    (ref_grad,) = torch.autograd.grad(ref, ref_x, go)
    close(shard.grad, ref_grad[..., start:start + widths[rank]], ATOL[dtype])


def cases(world):
    """(widths, options) for a world size: even, uneven and (world 4) empty shards."""
    shards = {2: [[5, 5], [9, 2]], 3: [[4, 1, 6], [3, 3, 3]], 4: [[3, 0, 5, 2], [4, 4, 4, 4]]}
    for widths in shards[world]:
        for reduction in ("none", "mean", "sum"):
            for eps, z in ((0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.3, 1e-2), (1.0, 0.0)):
                yield widths, dict(reduction=reduction, label_smoothing=eps, z_loss=z)
        w = widths
        yield w, dict(pass_start=True, label_smoothing=0.1)
        yield w, dict(ignore_index=3, n_ignored=3, reduction="sum")  # ignore_index a real class
        yield w, dict(n_ignored=6, reduction="mean")                 # all ignored: nan, zero grad
        yield w, dict(n_ignored=6, reduction="sum", label_smoothing=0.2)
        yield w, dict(shape=(2, 3), z_loss=1e-3, label_smoothing=0.1, reduction="none")
        yield w, dict(shape=(), n_ignored=0, reduction="none")      # logits (V_r,), target ()
        yield w, dict(shape=(0,), n_ignored=0, reduction="sum")     # no rows
        yield w, dict(dtype=torch.float64, label_smoothing=0.2, z_loss=1e-2)
        yield w, dict(dtype=torch.bfloat16, label_smoothing=0.1)
        yield w, dict(dtype=torch.float16, z_loss=1e-2, reduction="none")
        yield w, dict(dtype=torch.bfloat16, shape=(7,), block=12, label_smoothing=0.1, z_loss=1e-2)
        yield w, dict(noncontig=True, shape=(2, 3), label_smoothing=0.1, z_loss=1e-2)
        yield [700 * k for k in w], dict(shape=(4,), n_ignored=1, label_smoothing=0.1, z_loss=1e-3)
        yield w, dict(module=True, label_smoothing=0.1, z_loss=1e-2, reduction="sum")
        yield w, dict(backend="reference", label_smoothing=0.1, z_loss=1e-2)
        yield w, dict(backend="triton", shape=(3,), n_ignored=1, label_smoothing=0.1)


def check_errors(world):
    """Bad input: every rank raises a clear exception, together (no rank hangs in a collective)."""
    rank = dist.get_rank()
    x = torch.randn(4, 3)
    t = torch.randint(0, 3 * world, (4,), generator=torch.Generator().manual_seed(0))  # same on all
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="target must have shape"):
        vocab_parallel_cross_entropy(x, t[:3])
    with pytest.raises(TypeError, match="target must hold int64"):
        vocab_parallel_cross_entropy(x, t.int())
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="vocab_start_index"):
        vocab_parallel_cross_entropy(x, t, vocab_start_index=-1)
    # Checks after the all-gather: all ranks see the same data and raise the same error.
    with pytest.raises(ValueError, match="tile"):  # every rank claims columns [0, 3)
        vocab_parallel_cross_entropy(x, t, vocab_start_index=0)
    with pytest.raises(ValueError, match="target differs across the ranks"):
        vocab_parallel_cross_entropy(x, (t + rank) % (3 * world))
    bad = t.clone()
    bad[1] = 3 * world  # one past the global vocab
    with pytest.raises(IndexError, match=f"target {3 * world} is out of bounds for {3 * world}"):
        vocab_parallel_cross_entropy(x, bad)
    bad[1] = -2
    with pytest.raises(IndexError, match="target -2 is out of bounds"):
        vocab_parallel_cross_entropy(x, bad)


def check_subgroup(world):
    """A process group of ranks 1..world-1: ranks are the group's, not the world's."""
    members = list(range(1, world))
    group = dist.new_group(members)  # every rank must call new_group
    if dist.get_rank() in members:
        widths = [2 + i for i in range(len(members))]
        run_case(widths, group=group, label_smoothing=0.1, z_loss=1e-2)
        run_case(widths, group=group, pass_start=True, reduction="none")
    else:
        with pytest.raises(ValueError, match="not a member of process_group"):
            vocab_parallel_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                                         process_group=group)
    dist.destroy_process_group(group)


def check_dtensor(world):
    """A DTensor sharded on the last dim (torch.chunk's uneven split) works as a plain shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(7)
    vocab = 2 * world + 1
    full = torch.randn(5, vocab, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (5,), generator=gen)
    x = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_(True)
    for tgt in (target, distribute_tensor(target, mesh, [Replicate()])):
        out = vocab_parallel_cross_entropy(x, tgt, label_smoothing=0.1)
        ref_x = full.clone().requires_grad_(True)
        ref = reference(ref_x, target, label_smoothing=0.1)
        close(out, ref.detach(), ATOL[torch.float64])
        out.backward()
        ref.backward()
        expected = distribute_tensor(ref_x.grad, mesh, [Shard(1)]).to_local()
        close(x.grad.to_local(), expected, ATOL[torch.float64])
        x.grad = None
    with pytest.raises(ValueError, match="sharded on its last dimension"):
        vocab_parallel_cross_entropy(distribute_tensor(full, mesh, [Shard(0)]), target)


def check_compile(world):
    """torch.compile(fullgraph=True) traces the collective and the kernel op (the checks that read
    data are skipped there): same loss and gradients."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(3)
    widths = [3 + r for r in range(world)]
    full = torch.randn(6, sum(widths), generator=gen)
    target = torch.randint(0, sum(widths), (6,), generator=gen)
    target[2] = -100
    start = sum(widths[:rank])
    x = full[:, start:start + widths[rank]].clone().requires_grad_(True)
    # aot_eager: the whole graph through dynamo and AOT autograd, without inductor codegen (slow).
    fn = torch.compile(vocab_parallel_cross_entropy, fullgraph=True, dynamic=False,
                       backend="aot_eager")
    out = fn(x, target, label_smoothing=0.1, z_loss=1e-2)
    out.backward()
    ref_x = full.double().requires_grad_(True)
    ref = reference(ref_x, target, label_smoothing=0.1, z_loss=1e-2)
    ref.backward()
    close(out, ref.detach(), ATOL[torch.float32])
    close(x.grad, ref_x.grad[:, start:start + widths[rank]], ATOL[torch.float32])


def check_ddp(world):
    """The ordinary losses under DistributedDataParallel (the README's claim): same gradients as
    torch.nn.CrossEntropyLoss under DDP, each rank with its own batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    gen = torch.Generator().manual_seed(10 + dist.get_rank())  # each rank its own batch
    x = torch.randn(8, 6, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    y[:dist.get_rank() + 1] = -100  # uneven ignored counts across ranks
    grads = []
    for loss_fn in (fusedloss.CrossEntropyLoss(label_smoothing=0.1),
                    torch.nn.CrossEntropyLoss(label_smoothing=0.1)):
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(6, 5))
        loss_fn(model(x), y).backward()
        grads.append(torch.cat([p.grad.view(-1) for p in model.parameters()]))
    close(grads[0], grads[1].double(), ATOL[torch.float32])
    every = [torch.empty_like(grads[0]) for _ in range(world)]
    dist.all_gather(every, grads[0])
    for g in every:  # the batches differ, the averaged gradients do not
        torch.testing.assert_close(g, grads[0])


def check_linear(world):
    """fusedloss.linear_cross_entropy with process_group: each rank holds an uneven slice of the
    head's rows (and bias); loss and gradients of input (all-reduced, or partial with
    reduce_grad_input=False), weight slice and bias slice vs float64 linear + cross_entropy on the
    full head; one all-gather in forward, one all-reduce (of grad_input) in backward."""
    from fusedloss.functional import linear_cross_entropy

    rank = dist.get_rank()
    widths = {2: [7, 2], 3: [4, 1, 6], 4: [3, 0, 5, 2]}[world]
    vocab, d = sum(widths), 5
    start = sum(widths[:rank])
    for i, kw in enumerate([dict(), dict(reduction="none", label_smoothing=0.1, z_loss=1e-2),
                            dict(reduction="sum", bias=True, label_smoothing=0.3, pass_start=True),
                            dict(shape=(2, 3), bias=True, z_loss=1e-3, block_rows=2),
                            dict(reduce_grad_input=False, bias=True, label_smoothing=0.1),
                            dict(n_ignored=6, reduction="mean"),
                            dict(dtype=torch.float32, label_smoothing=0.1, block_rows=4),
                            dict(backend="triton", shape=(3,), label_smoothing=0.1)]):
        kw = dict(kw)
        gen = torch.Generator().manual_seed(100 + i)
        shape, dtype = kw.pop("shape", (6,)), kw.pop("dtype", torch.float64)
        bias, pass_start, backend = kw.pop("bias", False), kw.pop("pass_start", False), \
            kw.pop("backend", "")
        n_ignored, reduce_gi = kw.pop("n_ignored", 2), kw.pop("reduce_grad_input", True)
        x = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
        W = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
        b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
        t = torch.randint(0, vocab, shape, generator=gen)
        t.view(-1)[torch.randperm(t.numel(), generator=gen)[:n_ignored]] = -100
        xa = x.to(dtype, copy=True).requires_grad_(True)
        Wa = W[start:start + widths[rank]].to(dtype, copy=True).requires_grad_(True)
        ba = b[start:start + widths[rank]].to(dtype, copy=True).requires_grad_(True) if bias \
            else None
        saved = _backend._ENV
        _backend._ENV = backend
        try:
            with count_collectives() as fwd_calls:
                out = linear_cross_entropy(xa, Wa, t, linear_bias=ba,
                                           process_group=dist.group.WORLD,
                                           vocab_start_index=start if pass_start else None,
                                           reduce_grad_input=reduce_gi, **kw)
            assert len(fwd_calls) == (1 if pass_start else 2), fwd_calls
            go = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            with count_collectives() as bwd_calls:
                out.backward(go.to(dtype))
            assert bwd_calls == (["all_reduce"] if reduce_gi else []), bwd_calls
        finally:
            _backend._ENV = saved
        kw.pop("block_rows", None)
        xr, Wr = x.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
        br = b.detach().clone().requires_grad_(True) if bias else None
        ref = reference(F.linear(xr, Wr, br), t, **kw)
        atol = ATOL[dtype] if backend != "triton" else 1e-7
        close(out, ref.detach(), atol)
        ref.backward(go)
        if reduce_gi:
            close(xa.grad, xr.grad, atol)
        else:  # this rank's partial gradient: the sum over ranks is the full one
            part = xa.grad.clone()
            dist.all_reduce(part)
            close(part, xr.grad, atol)
        close(Wa.grad, Wr.grad[start:start + widths[rank]], atol)
        if bias:
            close(ba.grad, br.grad[start:start + widths[rank]], atol)


def _worker(rank, world, tmp):
    torch.set_num_threads(1)  # world processes share few cores: spinning OpenMP threads stall them
    # A file store in the test's fresh directory: no TCP port to pick or race for.
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for i, (widths, kw) in enumerate(cases(world)):
            try:
                run_case(widths, seed=i, **kw)
            except Exception as e:  # name the case in the report
                raise AssertionError(f"rank {rank}, widths {widths}, {kw}: {e}") from e
        check_errors(world)
        check_subgroup(world)
        check_dtensor(world)
        check_ddp(world)
        check_linear(world)
        if world == 2:  # compiling takes seconds: one world size is enough
            check_compile(world)
    except BaseException:
        # spawn reports the first worker to exit, often a peer whose collective broke because
        # this one failed: keep every worker's traceback for the report.
        with open(f"{tmp}/rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_vocab_parallel(world, tmp_path):
    # forkserver: one clean process imports torch and fusedloss once; every worker is forked from
    # it in a fraction of a second (spawn re-imports torch in each, several times slower on a busy
    # machine), and none inherits pytest's threads or CUDA state (as plain fork would).
    mp.get_context("forkserver").set_forkserver_preload(["torch", "fusedloss"])
    ctx = mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):  # raises if a worker failed (after stopping the others)
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"vocab-parallel workers (world {world}) still running after 180 s")
    except mp.ProcessRaisedException:
        errors = "\n".join(f"--- {p.name}\n{p.read_text()}"
                           for p in sorted(tmp_path.glob("rank*.err")))
        pytest.fail(f"vocab-parallel workers failed (world {world}):\n{errors}")


def test_needs_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_device_side_checks_of_the_gathered_stats():
    """The CUDA path checks the gathered (start, width, target) rows with one device-side
    assertion instead of a host read; its predicate, run here on CPU tensors (where
    torch._assert_async raises at once): slices must tile [0, V) in any rank order, targets must
    agree across ranks and lie in [0, V) or be ignore_index."""
    from fusedloss.distributed import _assert_gathered

    def gathered(starts, widths, targets):
        n = len(targets[0])
        return torch.stack([torch.cat([torch.tensor([s, w], dtype=torch.float64),
                                       torch.zeros(3 * n, dtype=torch.float64),
                                       torch.tensor(t, dtype=torch.float64)])
                            for s, w, t in zip(starts, widths, targets)])

    _assert_gathered(gathered([0, 5], [5, 4], [[0, 8, -100]] * 2), -100)
    _assert_gathered(gathered([5, 0, 9], [4, 5, 0], [[0, 1, 2]] * 3), -100)  # any order, empty
    for bad in [gathered([0, 6], [5, 4], [[0, 8, -100]] * 2),      # a gap
                gathered([0, 4], [5, 4], [[0, 7, -100]] * 2),      # an overlap
                gathered([0, 5], [5, 4], [[0, 9, -100]] * 2),      # target == V
                gathered([0, 5], [5, 4], [[0, -1, 1]] * 2),        # -1, not ignored
                gathered([0, 5], [5, 4], [[0, 1, 2], [0, 1, 3]])]:  # ranks disagree
        with pytest.raises(RuntimeError):
            _assert_gathered(bad, -100)
