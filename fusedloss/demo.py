"""Demo: train a small classifier twice, with fusedloss.CrossEntropyLoss and with
torch.nn.CrossEntropyLoss, from the same initial weights and batches, and print both losses side by
side; then time one forward+backward of both losses on an LM-sized batch.

    python -m fusedloss.demo
"""
import copy
import statistics
import time

import torch

import fusedloss


def make_data(n=4096, d=32, classes=10, seed=0):
    """A synthetic task with structure a small MLP can learn: labels from a random teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, classes, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


def train(model, loss_fn, x, y, steps=200, batch=256, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def time_fwd_bwd(loss_fn, logits, target, reps=5):
    times = []
    for _ in range(reps + 1):
        x = logits.detach().requires_grad_(True)
        t0 = time.perf_counter()
        loss_fn(x, target).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def main():
    torch.manual_seed(0)
    x, y = make_data()
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ours = train(copy.deepcopy(model), fusedloss.CrossEntropyLoss(label_smoothing=0.05), x, y)
    theirs = train(copy.deepcopy(model), torch.nn.CrossEntropyLoss(label_smoothing=0.05), x, y)
    print("step   fusedloss.CrossEntropyLoss   torch.nn.CrossEntropyLoss")
    for step in (0, 25, 50, 100, 150, 199):
        print(f"{step:4d}   {ours[step]:26.6f}   {theirs[step]:25.6f}")
    print(f"max |difference| over {len(ours)} steps: "
          f"{max(abs(a - b) for a, b in zip(ours, theirs)):.2e}")

    n, v = 2048, 32000
    logits, target = torch.randn(n, v), torch.randint(0, v, (n,))
    t_ours = time_fwd_bwd(fusedloss.functional.cross_entropy, logits, target)
    t_torch = time_fwd_bwd(torch.nn.functional.cross_entropy, logits, target)
    print(f"fwd+bwd N={n} V={v} fp32 on {logits.device}: fusedloss {t_ours:.1f} ms, "
          f"torch {t_torch:.1f} ms ({t_torch / t_ours:.2f}x) [median of 5, {torch.get_num_threads()} threads]")


if __name__ == "__main__":
    main()
