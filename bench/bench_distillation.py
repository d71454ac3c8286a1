"""Distillation loss forward+backward (forward KL at temperature T, times T^2, 'batchmean'):
fusedloss vs the eager formula (log_softmax of both logits, then F.kl_div(log_target=True)) and
its torch.compile (and Liger-Kernel's kl_div over the same log-softmaxes on CUDA where installed).

    python bench/bench_distillation.py                 # CPU: N=1024 V=32000 (see --n), CUDA: larger
    python bench/bench_distillation.py --n 4096        # the issue's CPU shape (slow on 2 cores)
    python bench/bench_distillation.py --quick
GB/s counts the fused minimum: the forward reads both logits, backward reads them again and writes
the student's gradient (5 logits-sized transfers). The "fusedloss inplace" row passes a view of the
student's logits (a non-leaf, standing in for an LM head's output), which backward overwrites.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fusedloss  # noqa: E402

T = 2.0


def eager(s, t):
    """The textbook formula: two log-softmaxes and torch's kl_div, times T^2."""
    return F.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                    reduction="batchmean", log_target=True) * (T * T)


def main():
    n_arg = None
    if "--n" in sys.argv:  # before _common's parser, which does not know it
        i = sys.argv.index("--n")
        n_arg = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
        os.environ["FUSEDLOSS_BENCH_N"] = str(n_arg)  # the memory children re-run this script
    n_arg = n_arg or int(os.environ.get("FUSEDLOSS_BENCH_N", "0")) or None
    args = _common.parse_args(__doc__)
    device = torch.device(args.device)
    if device.type == "cuda":
        shapes = [(8192, 32000, torch.bfloat16), (8192, 128256, torch.bfloat16),
                  (4096, 128256, torch.float32)]
    else:
        n = n_arg or 1024
        shapes = [(n, 32000, torch.float32), (n, 32000, torch.bfloat16)]
    if args.quick:
        shapes = [(128, 32000, torch.float32)]

    def make(n, v, dtype):
        def inputs():
            g = torch.Generator(device="cpu").manual_seed(0)
            s = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
            t = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=dtype)
            return s.requires_grad_(True), t
        return inputs

    fused = fusedloss.functional.distillation_loss
    compiled = torch.compile(eager)
    providers = {
        "fusedloss": lambda i: _common.fwd_bwd(lambda: fused(*i, temperature=T), i[0]),
        "fusedloss inplace": lambda i: _common.fwd_bwd(
            lambda: fused(i[0].view_as(i[0]), i[1], temperature=T, inplace_backward=True), i[0]),
        "torch": lambda i: _common.fwd_bwd(lambda: eager(*i), i[0]),
        "torch.compile": lambda i: _common.fwd_bwd(lambda: compiled(*i), i[0]),
    }
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_kl_div

            providers["liger kl_div"] = lambda i: _common.fwd_bwd(lambda: liger_kl_div(
                torch.log_softmax(i[0] / T, -1), torch.log_softmax(i[1] / T, -1), None, None,
                "batchmean", True) * (T * T), i[0])
        except ImportError:
            pass
    cases = [(f"N={n} V={v} {str(dt).replace('torch.', '')}", make(n, v, dt))
             for n, v, dt in shapes]
    nbytes = lambda i: 5 * i[0].numel() * i[0].element_size()  # noqa: E731
    _common.run("distillation", cases, providers, nbytes, args)


if __name__ == "__main__":
    main()
