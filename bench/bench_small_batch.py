"""Per-call overhead: forward+backward of a 32x10 batch for each drop-in loss, fusedloss next to
torch in one process, one thread, thread CPU time (robust to other processes on a shared machine).
Providers are interleaved: each round times a block of calls of torch, then of fusedloss; the
ratio is the median over rounds of the per-round ratios (a slow spell hits both sides of a round).
At this size a loss's time is Python, dispatch and autograd overhead.

    python bench/bench_small_batch.py [label] [--rounds R] [--calls N] [--shape NxC[,NxC...]]

--shape times other batches, one line each (64x64: a few thousand elements, where fusedloss should
already win). --ops-too also times fusedloss with its direct calls switched off (each loss's
`_direct` set to None between blocks, so that the whole-loss ops are called through torch.ops, as
under a mode or a profiler), interleaved in the same rounds: what csrc/python.cpp saves.
"""
import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import fusedloss

FL = fusedloss.functional


def block_us(fn, x0, target, n):
    t0 = time.thread_time()
    for _ in range(n):
        x = x0.detach().requires_grad_()
        fn(x, target).backward()
    return (time.thread_time() - t0) / n * 1e6


def _torch_sigmoid_focal(x, y, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss (mean), in plain torch ops as torchvision writes it."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.mean()


def _torch_softmax_focal(x, t, gamma=2.0):
    """Softmax focal loss (mean) in eager torch: -(1 - p_t)^gamma log p_t."""
    logpt = F.log_softmax(x, 1).gather(1, t[:, None]).squeeze(1)
    return (-((1 - logpt.exp()) ** gamma) * logpt).mean()


def _torch_distill(student, teacher):
    """Forward-KL distillation (temperature 1) as eager torch writes it."""
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean",
                    log_target=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("label", nargs="?", default="")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--shape", default="32x10", help="NxC, or several, comma-separated")
    p.add_argument("--ops-too", action="store_true",
                   help="also time fusedloss through torch.ops (direct calls off)")
    args = p.parse_args()
    torch.set_num_threads(1)
    for shape in args.shape.lower().split(","):
        n, c = (int(v) for v in shape.split("x"))
        print(args.label, shape, " | ".join(run_shape(n, c, args)), flush=True)


def run_shape(n, c, args):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, c, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    y = torch.rand(n, c, generator=g)
    pw = torch.rand(c, generator=g) + 0.5
    q = torch.softmax(torch.randn(n, c, generator=g), 1)
    teacher = torch.randn(n, c, generator=g)
    cases = [("cross_entropy", F.cross_entropy, FL.cross_entropy, t),
             ("cross_entropy_ls", lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1),
              lambda x, t: FL.cross_entropy(x, t, label_smoothing=0.1), t),
             ("bce_with_logits", F.binary_cross_entropy_with_logits,
              FL.binary_cross_entropy_with_logits, y),
             ("bce_pos_weight", lambda x, y: F.binary_cross_entropy_with_logits(x, y, pos_weight=pw),
              lambda x, y: FL.binary_cross_entropy_with_logits(x, y, pos_weight=pw), y),
             ("huber", F.huber_loss, FL.huber_loss, y),
             ("smooth_l1", F.smooth_l1_loss, FL.smooth_l1_loss, y),
             ("kl_div", lambda x, q: F.kl_div(x, q, reduction="batchmean"),
              lambda x, q: FL.kl_div(x, q, reduction="batchmean"), q),
             ("sigmoid_focal", _torch_sigmoid_focal,
              lambda x, y: FL.sigmoid_focal_loss(x, y, reduction="mean"), y),
             ("softmax_focal", _torch_softmax_focal, FL.softmax_focal_loss, t),
             ("distillation", _torch_distill, FL.distillation_loss, teacher)]
    out = []
    for name, theirs, ours, target in cases:
        block_us(theirs, x0, target, args.calls)  # warm-up
        block_us(ours, x0, target, args.calls)
        a, b, c = [], [], []
        for _ in range(args.rounds):
            a.append(block_us(theirs, x0, target, args.calls))
            b.append(block_us(ours, x0, target, args.calls))
            if args.ops_too:
                with _direct_calls_off():
                    c.append(block_us(ours, x0, target, args.calls))
        ratio = statistics.median(y / x for x, y in zip(a, b))
        line = (f"{name} torch={statistics.median(a):.0f}us "
                f"fusedloss={statistics.median(b):.0f}us ratio={ratio:.2f}")
        if c:
            line += (f" ops={statistics.median(c):.0f}us "
                     f"ratio_ops={statistics.median(y / x for x, y in zip(a, c)):.2f}")
        out.append(line)
    return out


@contextlib.contextmanager
def _direct_calls_off():
    """The functionals' direct calls (csrc/python.cpp) switched off: they call the ops."""
    modules = [fusedloss.cross_entropy, fusedloss._elementwise, fusedloss.distillation,
               fusedloss.focal]
    saved = [m._direct for m in modules]
    for m in modules:
        m._direct = None
    try:
        yield
    finally:
        for m, d in zip(modules, saved):
            m._direct = d


if __name__ == "__main__":
    main()
