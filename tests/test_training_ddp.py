"""TrainStep under DDP and FSDP2: 2 gloo processes on the CPU reach the parameters of a
single-process run over the same global batches (with gradient-norm clipping, mean and num_items
modes), and gradients are reduced only on the boundary micro-batch of each accumulation window."""
import contextlib
import datetime
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import fusedloss

WORLD, ACCUM, STEPS, ROWS = 2, 2, 3, 6  # ROWS per rank per micro-batch


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def global_batches(summed):
    """STEPS * ACCUM global micro-batches of WORLD * ROWS rows. For the summed loss some targets
    are ignored, all on rank 0's rows, so that only the num_items normalisation (the mean over
    all valid tokens of all ranks) matches the single-process run."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(STEPS * ACCUM):
        x = torch.randn(WORLD * ROWS, 8, generator=g)
        y = torch.randint(0, 4, (WORLD * ROWS,), generator=g)
        if summed:
            y[: 1 + i % 4] = -100
        out.append((x, y))
    return out


def train(model, summed, rank=None, on_step=None, around_call=contextlib.nullcontext):
    """STEPS optimizer steps with TrainStep on rank's rows (rank=None: all rows, one process);
    each call runs inside around_call(). Returns the boundary calls' results."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ce = fusedloss.CrossEntropyLoss(reduction="sum" if summed else "mean")
    step = fusedloss.TrainStep(model, opt, ce, accum_steps=ACCUM, clip="norm", max_norm=0.25)
    if on_step is not None:
        on_step(step)
    stepped = []
    for x, y in global_batches(summed):
        if rank is not None:
            x, y = x[rank * ROWS:(rank + 1) * ROWS], y[rank * ROWS:(rank + 1) * ROWS]
        with around_call():
            r = step(x, y, num_items=(y != -100).sum() if summed else None)
        if r.stepped:
            stepped.append(r)
    return stepped


def run_workers(worker, tmp_path, what, timeout=120):
    """Runs worker(rank, init_method, out_prefix) in WORLD processes; returns what each saved
    with torch.save(obj, f"{out_prefix}.{rank}")."""
    out = str(tmp_path / "result")
    # A file store in a fresh directory (no TCP port to race for); fork starts the workers in a
    # fraction of a second where spawn re-imports torch in each. CPU tensors only.
    ctx = mp.start_processes(worker, args=(f"file://{tmp_path / 'store'}", out), nprocs=WORLD,
                             join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):  # raises if a worker failed, after stopping the other
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{what} workers still running after {timeout} s")
    return [torch.load(f"{out}.{r}") for r in range(WORLD)]


def init_worker(init_method, rank):
    torch.set_num_threads(1)  # two processes on few shared cores: no spinning OpenMP threads
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))


def _ddp_worker(rank, init_method, out_path):
    init_worker(init_method, rank)
    try:
        results = {}
        for summed in (False, True):
            inner = make_model()
            model = nn.parallel.DistributedDataParallel(inner)
            steps, reduced_at = [], []

            def counting_hook(state, bucket):
                reduced_at.append(steps[0].micro_step)  # the micro-step being back-propagated
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_hook)
            train(model, summed, rank, on_step=steps.append)
            results[summed] = {"params": [p.detach().clone() for p in inner.parameters()],
                               "reduced_at": reduced_at}
        torch.save(results, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    ranks = run_workers(_ddp_worker, tmp_path, "DDP")
    for summed in (False, True):
        ref = make_model()
        train(ref, summed)
        for r, res in enumerate(ranks):
            # one all-reduce per optimizer step (one bucket), always on the last micro-batch
            assert res[summed]["reduced_at"] == [ACCUM - 1] * STEPS, (summed, r)
            for p, q in zip(ref.parameters(), res[summed]["params"]):
                torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def count_comms(log):
    """Appends to `log` the collectives run inside, by op name (CommDebugMode sees the c10d and
    functional collectives that FSDP2 and DTensor dispatch)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        yield
    log.append({str(op): n for op, n in mode.get_comm_counts().items()})


def _fsdp2_worker(rank, init_method, out_path):
    from torch.distributed.fsdp import fully_shard

    init_worker(init_method, rank)
    # FSDP2's note on a root returning a view, and the module tracker's backward hooks on inputs
    # without gradients: both expected here.
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    try:
        results = {}
        for root in (True, False):  # fully_shard on the model too, or only on its submodules
            for summed in (False, True):
                model = make_model()
                fully_shard(model[0])
                fully_shard(model[2])
                if root:
                    fully_shard(model)
                comms = []
                stepped = train(model, summed, rank, around_call=lambda: count_comms(comms))
                results[root, summed] = {
                    "params": [p.full_tensor() for p in model.parameters()],  # all-gathered
                    "grad_norm": [r.grad_norm for r in stepped],
                    "comms": comms}
        # A window left after its first micro-batch must not leave sync off: a plain backward
        # after it reduce-scatters as usual.
        step = fusedloss.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   fusedloss.CrossEntropyLoss(), accum_steps=2)
        x, y = global_batches(False)[0]
        step(x, y)
        comms = []
        with count_comms(comms):
            model(x).sum().backward()
        results["abandoned"] = comms[0]
        torch.save(results, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fsdp2_accumulation_reduces_once_per_window(tmp_path):
    """FSDP2 has no no_sync(): TrainStep turns gradient sync off on every fully_shard module,
    root or not, except on the boundary micro-batch. k micro-batches on 2 ranks give the update
    of one process on the k * 2 times larger batch, clipping active; reduce-scatters (and any
    all-reduce) happen only on the boundary, and it all-gathers no more than a micro-step does."""
    import torch.distributed.fsdp  # noqa: F401  (imported once here, inherited by the forks)

    ranks = run_workers(_fsdp2_worker, tmp_path, "FSDP2")
    refs = {}
    for summed in (False, True):
        ref = make_model()
        refs[summed] = ref, train(ref, summed)
        assert all(s.clip_coef < 1 for s in refs[summed][1]), "clipping must be active"
    for r, rank_res in enumerate(ranks):
        assert rank_res.pop("abandoned").get("c10d._reduce_scatter_base_") == 2, r
        for (root, summed), res in rank_res.items():
            ref, ref_steps = refs[summed]
            where = dict(root=root, summed=summed, rank=r)
            torch.testing.assert_close(torch.stack(res["grad_norm"]),
                                       torch.stack([s.grad_norm for s in ref_steps]),
                                       rtol=1e-5, atol=0, msg=lambda m: f"{where}: {m}")
            for p, q in zip(ref.parameters(), res["params"]):
                torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{where}: {m}")
            comms = res["comms"]
            assert len(comms) == STEPS * ACCUM
            reduces = [sum(n for op, n in c.items() if "reduce" in op) for c in comms]
            scatters = [sum(n for op, n in c.items() if "reduce_scatter" in op) for c in comms]
            gathers = [sum(n for op, n in c.items() if "gather" in op) for c in comms]
            boundary = [i % ACCUM == ACCUM - 1 for i in range(len(comms))]
            assert all((n == 0) != b for n, b in zip(reduces, boundary)), (where, comms)
            # one reduce-scatter per sharded module holding parameters (two) per window
            assert all(n == 2 for n, b in zip(scatters, boundary) if b), (where, comms)
            assert len(set(gathers)) == 1 and gathers[0] > 0, (where, comms)
