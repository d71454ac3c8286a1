"""Global gradient norm and norm clipping over many parameters: fusedloss.training vs
torch.nn.utils (foreach and per-tensor paths) and a naive per-tensor Python loop.

    python bench/bench_training.py            # CPU here, CUDA where present
    python bench/bench_training.py --quick
A case is a set of gradients, e.g. "2000 x 4096 fp32": 2000 tensors of 4096 elements each (a model
with thousands of small tensors: biases, norms, small projections). GB/s counts one read of every
gradient (norm) or one read plus one write (clip). fusedloss takes the norm in fp32 whatever the
gradient dtype; torch.nn.utils takes it in the gradient dtype.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from fusedloss import training  # noqa: E402


def naive_norm(grads):
    """What a hand-written loop often does: one norm per tensor, then the norm of the norms."""
    return torch.stack([g.float().norm() for g in grads]).norm()


def main():
    args = _common.parse_args(__doc__)
    device = torch.device(args.device)
    sets = [(2000, 4096, torch.float32), (2000, 4096, torch.bfloat16), (200, 262144, torch.float32)]
    if args.quick:
        sets = [(2000, 256, torch.float32)]

    def make(count, numel, dtype):
        def inputs():
            g = torch.Generator().manual_seed(0)
            params = []
            for _ in range(count):
                p = torch.nn.Parameter(torch.empty(numel, dtype=dtype, device=device))
                p.grad = torch.randn(numel, generator=g).to(device=device, dtype=dtype)
                params.append(p)
            return params
        return inputs

    grads = lambda ps: [p.grad for p in ps]  # noqa: E731
    providers = {
        "norm: fusedloss grad_norm": lambda ps: training.grad_norm(ps),
        "norm: torch get_total_norm": lambda ps: torch.nn.utils.get_total_norm(grads(ps)),
        "norm: torch get_total_norm foreach=False":
            lambda ps: torch.nn.utils.get_total_norm(grads(ps), foreach=False),
        "norm: naive loop": lambda ps: naive_norm(grads(ps)),
        "clip: fusedloss clip_grad_norm_": lambda ps: training.clip_grad_norm_(ps, 1.0),
        "clip: torch clip_grad_norm_": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0),
    }
    cases = [(f"{c} x {n} {str(dt).replace('torch.', '')}", make(c, n, dt)) for c, n, dt in sets]
    nbytes = lambda ps: sum(p.grad.numel() * p.grad.element_size() for p in ps)  # noqa: E731
    _common.run("training_norm", cases, providers, nbytes, args)


if __name__ == "__main__":
    main()
