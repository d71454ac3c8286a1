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
    if device.type == "cuda":
        sizes = [(1 << 26, torch.float32), (1 << 26, torch.bfloat16)]
    else:
        sizes = [(1 << 22, torch.float32), (1 << 22, torch.bfloat16)]
    if args.quick:
        sizes = [(1 << 18, torch.float32)]

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
    cases = [(f"n=2^{n.bit_length() - 1} {str(dt).replace('torch.', '')}", make(n, dt))
             for n, dt in sizes]
    nbytes = lambda i: 3 * i[0].numel() * i[0].element_size()  # noqa: E731
    _common.run("huber", cases, providers, nbytes, args)


if __name__ == "__main__":
    main()
