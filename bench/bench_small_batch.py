"""Per-call overhead: forward+backward of a 32x10 batch for each drop-in loss, fusedloss next to
torch in one process, one thread, thread CPU time (robust to other processes on a shared machine),
medians of 7 x 2000 calls. At this size a loss's time is Python, dispatch and autograd overhead.

    python bench/bench_small_batch.py [label]    # prints one line; run it alternately on two trees
"""
import sys
import time

import torch
import torch.nn.functional as F

import fusedloss

FL = fusedloss.functional


def per_call_us(fn, x0, target, n=2000):
    runs = []
    for _ in range(7):
        t0 = time.thread_time()
        for _ in range(n):
            x = x0.detach().requires_grad_()
            fn(x, target).backward()
        runs.append((time.thread_time() - t0) / n * 1e6)
    return sorted(runs)[3]


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(32, 10, generator=g)
    t = torch.randint(0, 10, (32,), generator=g)
    y = torch.rand(32, 10, generator=g)
    cases = [("cross_entropy", F.cross_entropy, FL.cross_entropy, t),
             ("bce_with_logits", F.binary_cross_entropy_with_logits,
              FL.binary_cross_entropy_with_logits, y),
             ("huber", F.huber_loss, FL.huber_loss, y),
             ("smooth_l1", F.smooth_l1_loss, FL.smooth_l1_loss, y)]
    out = []
    for name, theirs, ours, target in cases:
        a, b = per_call_us(theirs, x0, target), per_call_us(ours, x0, target)
        out.append(f"{name} torch={a:.0f}us fusedloss={b:.0f}us ratio={b / a:.2f}")
    print(sys.argv[1] if len(sys.argv) > 1 else "", " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
