"""Plot the newest benchmark rows of bench/results/results.csv: for each loss and device, forward+
backward median time and peak memory per case and provider (bench/results/<loss>_<device>.png;
CPU rows of AVX2 code, on an AVX2 CPU or with FUSEDLOSS_MAX_ISA=avx2, in <loss>_cpu_avx2.png).

    python bench/plot.py          # needs matplotlib
"""
import csv
import os
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def newest_rows(path):
    """The last row of each (loss, device, case, provider): reruns replace older figures."""
    rows = OrderedDict()
    with open(path) as f:
        for r in csv.DictReader(f):
            if r.get("thp") == "on":  # huge-page runs are their own cases (see bench/_common.py)
                r["case"] += " THP"
            r["avx2"] = r.get("isa") == "AVX2"
            rows[(r["loss"], r["device"], r["avx2"], r["case"], r["provider"])] = r
    return list(rows.values())


def plot(loss, device, avx2, rows):
    cases = list(OrderedDict.fromkeys(r["case"] for r in rows))
    providers = list(OrderedDict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 * len(cases) + 2.5))
    height = 0.8 / len(providers)
    for ax, key, label in [(axes[0], "median_ms", "fwd+bwd median (ms), lower is better"),
                           (axes[1], "peak_mb", "peak memory (MiB), lower is better")]:
        for i, p in enumerate(providers):
            vals = []
            for c in cases:
                r = next((r for r in rows if r["case"] == c and r["provider"] == p), None)
                vals.append(float(r[key]) if r else 0.0)
            ax.barh([j + i * height for j in range(len(cases))], vals, height, label=p)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(cases))], cases)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{loss} on {device}" + (", AVX2 code" if avx2 else ""))
    fig.tight_layout()
    kind = ("cpu_avx2" if avx2 else "cpu") if "threads" in device else "cuda"
    out = os.path.join(RESULTS, f"{loss}_{kind}.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main():
    rows = newest_rows(os.path.join(RESULTS, "results.csv"))
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["loss"], r["device"], r["avx2"]), []).append(r)
    for (loss, device, avx2), rs in groups.items():
        print(plot(loss, device, avx2, rs))


if __name__ == "__main__":
    main()
