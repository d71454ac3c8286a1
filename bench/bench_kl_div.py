"""KL divergence forward+backward: fusedloss vs eager F.kl_div vs torch.compile, with
reduction="batchmean", on log-probabilities (input) and probabilities (target, no gradient), and
with log_target=True.

    python bench/bench_kl_div.py            # CPU here, CUDA where present
    python bench/bench_kl_div.py --quick
"torch.compile xlogy form" compiles xlogy(t, t) - t x summed over the batch (what F.kl_div
computes), a second compiled baseline for probability targets. GB/s counts what an ideal fused
pass moves: one read of input and target and one write of the input gradient.
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
    large = ([(8192, 8192, f32), (8192, 8192, bf16)] if device.type == "cuda"
             else [(2048, 2048, f32), (2048, 2048, bf16)])
    sizes = _common.pick(args, {"tiny": [(32, 10, f32)], "mid": [(256, 1000, f32)],
                                "large": large}, quick=[(256, 1024, f32)])

    def make(n, c, dtype):
        def inputs():  # input log-probabilities; the target as probabilities and as log-probs
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.log_softmax(torch.randn(n, c, generator=g), 1).to(device=device, dtype=dtype)
            lt = torch.log_softmax(torch.randn(n, c, generator=g), 1)
            return x.requires_grad_(True), lt.exp().to(device, dtype), lt.to(device, dtype)
        return inputs

    providers = {}
    for log_target in (False, True):
        name = "kl_div log_target" if log_target else "kl_div"
        theirs = (lambda lt: lambda x, t: F.kl_div(x, t, reduction="batchmean", log_target=lt))(
            log_target)
        ours = (lambda lt: lambda x, t: fusedloss.functional.kl_div(
            x, t, reduction="batchmean", log_target=lt))(log_target)
        provs = [("fusedloss", ours), ("torch", theirs), ("torch.compile", torch.compile(theirs))]
        if not log_target:  # F.kl_div's formula, compiled: a second compiled baseline
            provs.append(("torch.compile xlogy form", torch.compile(
                lambda x, t: (torch.xlogy(t, t) - t * x).sum() / x.shape[0])))
        for prov, fn in provs:
            providers[f"{name} {prov}"] = (lambda fn, k: lambda i: _common.fwd_bwd(
                lambda: fn(i[0], i[k]), i[0]))(fn, 2 if log_target else 1)
    cases = [(f"{n}x{c} {str(dt).replace('torch.', '')}", make(n, c, dt)) for n, c, dt in sizes]
    nbytes = lambda i: 3 * i[0].numel() * i[0].element_size()  # noqa: E731
    _common.run("kl_div", cases, providers, nbytes, args)


if __name__ == "__main__":
    main()
