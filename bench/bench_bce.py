"""BCE-with-logits forward+backward: fusedloss vs eager F.binary_cross_entropy_with_logits vs
torch.compile.

    python bench/bench_bce.py            # CPU here, CUDA where present
    python bench/bench_bce.py --quick
GB/s counts what an ideal fused pass moves: one read of input and target and one write of the
input gradient (the broadcast pos_weight is too small to count).
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
    large = ([((8192, 8192), f32), ((8192, 8192), bf16), ((64, 80, 128, 128), bf16)]
             if device.type == "cuda" else
             [((2048, 2048), f32), ((2048, 2048), bf16), ((16, 64, 64, 64), f32)])
    shapes = _common.pick(args, {"tiny": [((32, 10), f32)], "mid": [((256, 1000), f32)],
                                 "large": large}, quick=[((256, 1024), f32)])

    def make(shape, dtype):
        def inputs():
            g = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
            x.requires_grad_(True)
            y = (torch.rand(shape, generator=g) > 0.7).to(device=device, dtype=dtype)
            # per-class pos_weight, broadcast as torch does: (C,) for 2-d, (C, 1, 1) for NCHW
            c = shape[1]
            pw = torch.rand((c,) + (1,) * (len(shape) - 2), generator=g).to(device) * 3
            return x, y, pw
        return inputs

    def loss(fn):
        return lambda i: _common.fwd_bwd(lambda: fn(i[0], i[1], pos_weight=i[2]), i[0])

    compiled = torch.compile(F.binary_cross_entropy_with_logits)
    providers = {
        "fusedloss": loss(fusedloss.functional.binary_cross_entropy_with_logits),
        "torch": loss(F.binary_cross_entropy_with_logits),
        "torch.compile": loss(compiled),
    }
    cases = [(f"{'x'.join(map(str, s))} {str(dt).replace('torch.', '')} pos_weight", make(s, dt))
             for s, dt in shapes]
    nbytes = lambda i: 3 * i[0].numel() * i[0].element_size()  # noqa: E731
    _common.run("bce_with_logits", cases, providers, nbytes, args)


if __name__ == "__main__":
    main()
