"""Linear + cross-entropy (LM head) forward+backward: fusedloss.linear_cross_entropy vs eager
F.linear + F.cross_entropy, torch.compile of the same, torch 2.13's chunked
F.linear_cross_entropy(options=LinearCrossEntropyOptions()), F.linear + fusedloss cross_entropy
(inplace_backward=True), and Liger-Kernel's fused linear cross-entropy on CUDA where installed.

    python bench/bench_linear_cross_entropy.py                      # the issue's shapes
    python bench/bench_linear_cross_entropy.py --shapes 1024x1024x32000:bfloat16
    python bench/bench_linear_cross_entropy.py --quick

Every provider computes the gradients of the hidden states [N, D] and of the head's weight [V, D].
GB/s counts one read of input and weight and one write of their gradients (an ideal fused pass).
The peak memory includes those gradients (N*D + V*D elements); the "extra" table subtracts them.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fusedloss  # noqa: E402


def main():
    args = _common.parse_args(__doc__, _common.shapes_arg("NxDxV", "4096x1024x32000:bfloat16"))
    device = torch.device(args.device)
    if args.shapes:
        shapes = _common.parse_shapes(args.shapes, 3)
    elif args.quick:
        shapes = [(512, 256, 4000, torch.float32)]
    else:  # the grid (on CUDA the same, N=8192)
        n = 8192 if device.type == "cuda" else 4096
        shapes = [(n, d, v, dt) for dt in (torch.float32, torch.bfloat16)
                  for d in (1024, 2048) for v in (32000, 128256)]

    def make(n, d, v, dtype):
        def inputs():
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
            w = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype)
            w.requires_grad_(True)
            t = torch.randint(0, v, (n,), generator=g).to(device)
            return x, w, t
        return inputs

    def eager(x, w, t):
        return F.cross_entropy(F.linear(x, w), t)

    compiled = torch.compile(eager)
    chunked = torch.nn.LinearCrossEntropyOptions()
    providers = {
        "torch eager": lambda i: _common.fwd_bwd(lambda: eager(*i), i[0], i[1]),
        "torch.compile": lambda i: _common.fwd_bwd(lambda: compiled(*i), i[0], i[1]),
        "torch chunked": lambda i: _common.fwd_bwd(
            lambda: F.linear_cross_entropy(i[0], i[1], i[2], options=chunked), i[0], i[1]),
        "linear + fusedloss CE inplace": lambda i: _common.fwd_bwd(
            lambda: fusedloss.functional.cross_entropy(F.linear(i[0], i[1]), i[2],
                                                       inplace_backward=True), i[0], i[1]),
        "fusedloss linear_cross_entropy": lambda i: _common.fwd_bwd(
            lambda: fusedloss.functional.linear_cross_entropy(*i), i[0], i[1]),
    }
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            providers["liger"] = lambda i: _common.fwd_bwd(
                lambda: liger_fused_linear_cross_entropy(i[0], i[1], i[2]), i[0], i[1])
        except ImportError:
            pass
    cases = [(f"N={n} D={d} V={v} {str(dt).replace('torch.', '')}", make(n, d, v, dt))
             for n, d, v, dt in shapes]
    nbytes = lambda i: 2 * (i[0].numel() + i[1].numel()) * i[0].element_size()  # noqa: E731
    rows = _common.run("linear_cross_entropy", cases, providers, nbytes, args)
    if rows:
        grads_mb = {c: (n * d + v * d) * torch.empty((), dtype=dt).element_size() / 2**20
                    for c, (n, d, v, dt) in zip((c for c, _ in cases), shapes)}
        print("\n| case | provider | peak MiB beyond the returned gradients | vs eager |")
        print("|---|---|---|---|")
        base = {}
        for r in rows:
            extra = r["peak_mb"] - grads_mb[r["case"]]
            if r["provider"] == "torch eager":
                base[r["case"]] = extra
            ratio = extra / base[r["case"]] if base.get(r["case"]) else float("nan")
            print(f"| {r['case']} | {r['provider']} | {extra:.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
