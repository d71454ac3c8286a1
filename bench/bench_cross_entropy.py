"""Cross-entropy forward+backward: fusedloss vs eager F.cross_entropy vs torch.compile (and
Liger-Kernel on CUDA where installed).

    python bench/bench_cross_entropy.py            # CPU here, CUDA where present
    python bench/bench_cross_entropy.py --quick
    python bench/bench_cross_entropy.py --shapes 1024x32000:bfloat16
GB/s counts one read of the logits and one write of their gradient. "floor" times two reads of
the logits and one write of a fresh logits-sized buffer (the table's "x floor" column divides by
it); "fusedloss forward" and "read" (x.sum()) compare the forward alone with one read.
The "fusedloss inplace" row passes a view of the logits (a non-leaf whose backward allocates nothing,
standing in for an LM head's output), which backward overwrites with the gradient.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fusedloss  # noqa: E402


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def main():
    args = _common.parse_args(__doc__, _common.shapes_arg("NxV", "1024x32000:bfloat16"))
    device = torch.device(args.device)
    f32, bf16 = torch.float32, torch.bfloat16
    large = ([(8192, 32000, bf16), (8192, 128256, bf16), (8192, 128256, f32), (4096, 262144, bf16)]
             if device.type == "cuda" else [(4096, 32000, f32), (4096, 32000, bf16)])
    shapes = _common.parse_shapes(args.shapes, 2) if args.shapes else _common.pick(
        args, {"tiny": [(32, 10, f32)], "mid": [(256, 1000, f32)], "large": large},
        quick=[(256, 32000, f32)])

    def make(n, v, dtype):
        def inputs():
            g = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
            x.requires_grad_(True)
            t = torch.randint(0, v, (n,), generator=g).to(device)
            return x, t
        return inputs

    compiled = torch.compile(F.cross_entropy)
    providers = {
        "fusedloss": lambda i: _common.fwd_bwd(lambda: fusedloss.functional.cross_entropy(*i), i[0]),
        # The lean path: the logits' memory receives their gradient.
        "fusedloss inplace": lambda i: _common.fwd_bwd(
            lambda: fusedloss.functional.cross_entropy(i[0].view_as(i[0]), i[1],
                                                       inplace_backward=True), i[0]),
        "torch": lambda i: _common.fwd_bwd(lambda: F.cross_entropy(*i), i[0]),
        "torch.compile": lambda i: _common.fwd_bwd(lambda: compiled(*i), i[0]),
        # What no fwd+bwd can avoid: two reads of the logits and one write of a fresh
        # logits-sized buffer (the gradient), page faults included.
        "floor": lambda i: (i[0].detach().amax(1), i[0].detach().amax(1),
                            torch.empty_like(i[0]).fill_(1.0)),
        # The forward alone, against one read of the logits (the "within 3x").
        "fusedloss forward": lambda i: _no_grad(fusedloss.functional.cross_entropy, *i),
        "read": lambda i: i[0].detach().sum(),
    }
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            providers["liger"] = lambda i: _common.fwd_bwd(lambda: liger_cross_entropy(*i), i[0])
        except ImportError:
            pass
    cases = [(f"N={n} V={v} {str(dt).replace('torch.', '')}", make(n, v, dt)) for n, v, dt in shapes]
    nbytes = lambda i: 2 * i[0].numel() * i[0].element_size()  # noqa: E731
    _common.run("cross_entropy", cases, providers, nbytes, args)


if __name__ == "__main__":
    main()
