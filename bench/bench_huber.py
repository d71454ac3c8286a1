"""Huber / SmoothL1 forward+backward: fusedloss vs eager F.huber_loss / F.smooth_l1_loss vs
torch.compile.

    python bench/bench_huber.py            # CPU here, CUDA where present
    python bench/bench_huber.py --quick
GB/s counts what an ideal fused pass moves: one read of input and target and one write of the
input gradient.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fusedloss  # noqa: E402


def main():
    args = _common.parse_args(__doc__)
    device = torch.device(args.device)
    f32, bf16 = torch.float32, torch.bfloat16
    large = ([(1 << 26, f32), (1 << 26, bf16)] if device.type == "cuda"
             else [(1 << 22, f32), (1 << 22, bf16)])
    # tiny and mid: the element counts of a 32x10 and a 256x1000 batch
    sizes = _common.pick(args, {"tiny": [(320, f32)], "mid": [(256000, f32)], "large": large},
                         quick=[(1 << 18, f32)])

    def make(n, dtype):
        def inputs():
            g = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(n, generator=g) * 2).to(device=device, dtype=dtype)
            x.requires_grad_(True)
            return x, torch.randn(n, generator=g).to(device=device, dtype=dtype)
        return inputs

    providers = {}
    for name, ours, theirs, kw in [
            ("huber", fusedloss.functional.huber_loss, F.huber_loss, dict(delta=0.5)),
            ("smooth_l1", fusedloss.functional.smooth_l1_loss, F.smooth_l1_loss, dict(beta=0.5))]:
        compiled = torch.compile(theirs)
        for prov, fn in (("fusedloss", ours), ("torch", theirs), ("torch.compile", compiled)):
            providers[f"{name} {prov}"] = (
                lambda fn, kw: lambda i: _common.fwd_bwd(lambda: fn(i[0], i[1], **kw), i[0]))(fn, kw)
    def label(n):
        return f"n=2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"n={n}"
    cases = [(f"{label(n)} {str(dt).replace('torch.', '')}", make(n, dt)) for n, dt in sizes]
    nbytes = lambda i: 3 * i[0].numel() * i[0].element_size()  # noqa: E731
    _common.run("huber", cases, providers, nbytes, args)


if __name__ == "__main__":
    main()
