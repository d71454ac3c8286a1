"""Focal losses forward+backward: fusedloss vs the eager torchvision formula vs its torch.compile.

    python bench/bench_focal.py            # CPU here, CUDA where present
    python bench/bench_focal.py --quick
Sigmoid focal on a RetinaNet-like shape (anchors x 80 classes, reduction 'sum' / num_pos, as
detectors use it); softmax focal on a segmentation shape (N, 19, H, W). The torchvision formula is
written out here (torchvision.ops.sigmoid_focal_loss); the softmax baseline ("eager formula" in
the softmax rows) is the usual eager form over log_softmax. GB/s counts one read of the inputs
(and targets) and one write of the gradient.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fusedloss  # noqa: E402
from fusedloss.reference import torchvision_sigmoid_focal_loss as tv_sigmoid_focal  # noqa: E402


def eager_softmax_focal(logits, target, gamma: float = 2.0, ignore_index: int = -100):
    """The common eager softmax focal loss: -(1 - p_t)^gamma log p_t, mean over valid pixels."""
    logp = F.log_softmax(logits, dim=1)
    valid = target != ignore_index
    lp = logp.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    loss = -((1 - lp.exp()) ** gamma) * lp
    return torch.where(valid, loss, 0.0).sum() / valid.sum()


def main():
    args = _common.parse_args(__doc__)
    device = torch.device(args.device)
    f32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cuda":
        sig_large = [(8, 24555, 80, f32), (8, 24555, 80, bf16)]
        seg_large = [(16, 19, 512, 512, f32), (16, 19, 512, 512, bf16)]
    else:
        sig_large = [(1, 200_000, 80, f32), (1, 200_000, 80, bf16)]
        seg_large = [(8, 19, 128, 128, f32)]
    # tiny and mid: a 32x10 and a 256x1000 batch (softmax: rows of an (N, C, 1, 1) input)
    sig_shapes = _common.pick(args, {"tiny": [(1, 32, 10, f32)], "mid": [(1, 256, 1000, f32)],
                                     "large": sig_large}, quick=[(1, 20_000, 80, f32)])
    seg_shapes = _common.pick(args, {"tiny": [(32, 10, 1, 1, f32)],
                                     "mid": [(256, 1000, 1, 1, f32)], "large": seg_large},
                              quick=[(2, 19, 64, 64, f32)])

    def make_sig(b, a, c, dtype):
        def inputs():
            g = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(b, a, c, generator=g) * 2 - 3).to(device=device, dtype=dtype)
            x.requires_grad_(True)
            # about 1 positive class in 1000: a RetinaNet-like foreground rate
            y = (torch.rand(b, a, c, generator=g) < 1e-3).to(device=device, dtype=dtype)
            return x, y, y.sum().float().clamp(min=1)
        return inputs

    def make_seg(n, c, h, w, dtype):
        def inputs():
            g = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(n, c, h, w, generator=g) * 2).to(device=device, dtype=dtype)
            x.requires_grad_(True)
            t = torch.randint(0, c, (n, h, w), generator=g)
            t[:, :4] = -100  # some ignored pixels
            return x, t.to(device)
        return inputs

    tv_compiled = torch.compile(tv_sigmoid_focal)
    sm_compiled = torch.compile(eager_softmax_focal)

    # One run (the harness re-runs this script per row to measure CPU peak memory): sigmoid
    # cases' inputs are (x, y, num_pos), softmax cases' (x, target); providers dispatch on that.
    def fused(i):
        if len(i) == 3:
            return fusedloss.functional.sigmoid_focal_loss(i[0], i[1], reduction="sum",
                                                           normalizer=i[2])
        return fusedloss.functional.softmax_focal_loss(i[0], i[1])

    def eager(i, sig=tv_sigmoid_focal, sm=eager_softmax_focal):
        return sig(i[0], i[1]).sum() / i[2] if len(i) == 3 else sm(*i)

    providers = {
        "fusedloss": lambda i: _common.fwd_bwd(lambda: fused(i), i[0]),
        "eager formula": lambda i: _common.fwd_bwd(lambda: eager(i), i[0]),
        "torch.compile": lambda i: _common.fwd_bwd(lambda: eager(i, tv_compiled, sm_compiled),
                                                   i[0]),
    }
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    cases = [(f"sigmoid {b}x{a}x{c} {name(dt)}", make_sig(b, a, c, dt))
             for b, a, c, dt in sig_shapes]
    cases += [(f"softmax {n}x{c}x{h}x{w} {name(dt)}", make_seg(n, c, h, w, dt))
              for n, c, h, w, dt in seg_shapes]

    def nbytes(i):
        # sigmoid: one read of x and y and one write of the gradient; softmax: x, int64 target,
        # gradient
        if len(i) == 3:
            return 3 * i[0].numel() * i[0].element_size()
        return 2 * i[0].numel() * i[0].element_size() + 8 * i[1].numel()

    _common.run("focal", cases, providers, nbytes, args)

if __name__ == "__main__":
    main()
