"""TrainStep under DDP: 2 gloo processes on the CPU reach the parameters of a single-process run
over the same global batches, and DDP all-reduces gradients only on the boundary micro-batch."""
import datetime
import time

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


def train(model, summed, rank=None, on_step=None):
    """STEPS optimizer steps with TrainStep on rank's rows (rank=None: all rows, one process)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ce = fusedloss.CrossEntropyLoss(reduction="sum" if summed else "mean")
    step = fusedloss.TrainStep(model, opt, ce, accum_steps=ACCUM, clip="norm", max_norm=0.5)
    if on_step is not None:
        on_step(step)
    for x, y in global_batches(summed):
        if rank is not None:
            x, y = x[rank * ROWS:(rank + 1) * ROWS], y[rank * ROWS:(rank + 1) * ROWS]
        step(x, y, num_items=(y != -100).sum() if summed else None)


def _worker(rank, init_method, out_path):
    torch.set_num_threads(1)  # two processes on few shared cores: no spinning OpenMP threads
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
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
    out = str(tmp_path / "result")
    # A file store in a fresh directory (no TCP port to race for); fork starts the workers in a
    # fraction of a second where spawn re-imports torch in each. CPU tensors only.
    ctx = mp.start_processes(_worker, args=(f"file://{tmp_path / 'store'}", out), nprocs=WORLD,
                             join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # raises if a worker failed, after stopping the other
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP workers still running after 120 s")
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for summed in (False, True):
        ref = make_model()
        train(ref, summed)
        for r, res in enumerate(ranks):
            # one all-reduce per optimizer step (one bucket), always on the last micro-batch
            assert res[summed]["reduced_at"] == [ACCUM - 1] * STEPS, (summed, r)
            for p, q in zip(ref.parameters(), res[summed]["params"]):
                torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)
