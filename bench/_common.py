"""Shared benchmark harness: forward+backward time, effective GB/s and peak memory per provider.

Each bench_<loss>.py builds cases (inputs on a device) and providers (callables running forward and
backward on those inputs), then calls `run`. Results: a markdown table on stdout, rows appended to
bench/results/results.csv (with device, versions and date) and a JSON file per loss.

Every script takes --sizes tiny,mid,large (32x10 measures per-call overhead, 256x1000 a small
classifier, large the bandwidth shapes) and prints a progress line per row on stderr. Each CSV row
records the ISA, thread count and whether THP allocation was on (run a script a second time with
THP_MEM_ALLOC_ENABLE=1 for the huge-page figures).

Every provider's first call is checked against the eager torch provider of its case (loss and
gradients, loosely: a bf16 tolerance for half-precision cases): a provider that computes something
else is timed but flagged, in the table and in the CSV's `check` column, and warned about on
stderr, so that a wrong result is never read as a win (it caught Inductor reusing kernels
compiled for another ISA: see the cache folder below).

Timing: triton.testing.do_bench (median, 20th/80th percentiles) on CUDA; torch.utils.benchmark on
the CPU. Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak RSS (VmHWM, reset
through /proc/self/clear_refs) above its level before the call, in a fresh process per row.
"""
import argparse
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

# Inductor's on-disk cache does not key its CPU kernels on ATEN_CPU_CAPABILITY: a run with
# ATEN_CPU_CAPABILITY=avx2 loaded the AVX-512 run's kernels and vice versa (torch 2.13; seen as
# half the loss and as heap corruption, in plain torch). One cache folder per ISA here.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = (
        f"{default_cache_dir()}_{torch.backends.cpu.get_cpu_capability().lower()}")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


SIZES = ("tiny", "mid", "large")


def parse_args(description: str, extra=None):
    """The common options; extra(parser), if given, adds a script's own."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    p.add_argument("--sizes", default=",".join(SIZES),
                   help="comma-separated subset of tiny (32x10: per-call overhead), mid "
                        "(256x1000) and large (the loss's bandwidth shapes)")
    p.add_argument("--providers", default=None, help="comma-separated subset of providers")
    p.add_argument("--no-save", action="store_true", help="print only; write no CSV/JSON")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every provider of a case this many times, interleaved (round-robin)"
                        ": the median of the rounds' medians is reported, and their min-max in "
                        "place of p20-p80 (a shared machine's slow spells hit every provider)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    args.sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in args.sizes if s not in SIZES]
    if bad:
        p.error(f"--sizes: unknown {bad}; choose from {SIZES}")
    return args


def shapes_arg(form: str, example: str):
    """An `extra` for parse_args: --shapes, comma-separated `form:dtype` items (parse_shapes)."""
    def add(p):
        p.add_argument("--shapes", default=None,
                       help=f"comma-separated {form}:dtype, e.g. {example} (instead of --sizes)")
    return add


def parse_shapes(text: str, ndim: int):
    """--shapes' items `AxB...:dtype` as tuples (A, B, ..., torch dtype) of ndim sizes."""
    out = []
    for item in text.split(","):
        dims, dt = item.split(":")
        sizes = tuple(int(s) for s in dims.split("x"))
        if len(sizes) != ndim or not isinstance(getattr(torch, dt, None), torch.dtype):
            raise SystemExit(f"--shapes: {item!r} is not {ndim} sizes and a dtype")
        out.append(sizes + (getattr(torch, dt),))
    return out


def pick(args, by_size: dict, quick):
    """The shapes to run: quick's for --quick, else by_size[s] for each size in --sizes."""
    if args.quick:
        return list(quick)
    return [shape for s in args.sizes for shape in by_size.get(s, [])]


def _rss_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fix_mmap_threshold() -> None:
    """CPU peak memory is read from the process RSS; glibc would keep freed blocks of up to 32 MiB
    resident (its dynamic mmap threshold), hiding them. A fixed threshold returns every large block
    to the OS on free, so RSS follows the live tensors. It also adds page faults to every large
    allocation, so it is set only in the processes that measure memory, never while timing."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)  # give back what the timing phase left in the heap
    except (OSError, AttributeError):
        pass


_CHILD = "FUSEDLOSS_BENCH_MEMORY"
if os.environ.get(_CHILD):
    _fix_mmap_threshold()  # before anything is allocated


def _peak_in_child(case: str, provider: str) -> float:
    """CPU peak memory of one (case, provider), measured in a fresh process running this same
    script: RSS-based figures in a process that already ran other providers depend on what the
    allocator kept from them."""
    env = dict(os.environ, **{_CHILD: f"{case}\t{provider}"})
    out = subprocess.run([sys.executable] + sys.argv, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_MB "):
            return float(line.split()[1])
    print(f"peak memory of {case} / {provider} not measured: {out.stderr[-500:]}", file=sys.stderr)
    return float("nan")


def peak_memory_mb(fn, device) -> float:
    """Peak memory that one call of fn adds above what is allocated before it, in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # fusedloss keeps its last freed logits-sized buffer for reuse (fusedloss.release_buffers):
    # freed here, so that the call's peak counts the buffer it needs.
    import fusedloss

    fusedloss.release_buffers()
    if not _reset_peak_rss():
        return float("nan")
    base = _rss_kb("VmRSS")
    fn()
    peak = _rss_kb("VmHWM")
    return (peak - base) / 1024 if base is not None and peak is not None else float("nan")


def time_ms(fn, device):
    """(median, p20, p80) of one call of fn, in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
        return tuple(q)
    from torch.utils import benchmark

    # torch.utils.benchmark.Timer runs on ONE thread unless told otherwise (num_threads=1): the
    # figures before 2026-12-01's second run were single-threaded for every provider.
    threads = torch.get_num_threads()
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn},
                        num_threads=threads).blocked_autorange(min_run_time=1.0)
    times = sorted(t * 1e3 for t in m.times)
    if len(times) < 3:  # few blocks for slow calls: take a few more single runs
        times = sorted(times + [t * 1e3 for t in benchmark.Timer(stmt="fn()", globals={"fn": fn},
                                                                 num_threads=threads)
                                .timeit(1).times for _ in range(3)])
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return statistics.median(times), q[1], q[7]


def versions() -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = ""
    return v


def machine(device) -> dict:
    """What a row's figures depend on besides the code: the ISA the kernels run (the CPU
    capability torch uses: AVX512 / AVX2 / DEFAULT, lowered by ATEN_CPU_CAPABILITY=avx2, which
    Inductor follows too; fusedloss's own follows FUSEDLOSS_MAX_ISA=avx2, and a row where the two
    differ says so; the GPU's compute capability), the thread count, and whether PyTorch's
    transparent-huge-page allocation is on (on the CPU a fresh logits-sized buffer pays
    first-touch page faults, ~4x fewer with THP)."""
    if device.type == "cuda":
        isa = "sm_%d%d" % torch.cuda.get_device_capability(device)
    else:
        isa = torch.backends.cpu.get_cpu_capability()
        ours = os.environ.get("FUSEDLOSS_MAX_ISA", "").upper()
        if ours and ours != isa:
            isa = f"{isa} (fusedloss {ours})"
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")
    return {"isa": isa, "threads": torch.get_num_threads(), "thp": "on" if thp else "off"}


def _cpu_model() -> str:
    """'AMD EPYC (family 25 model 1)' from /proc/cpuinfo (the model name alone does not tell a
    Zen 3 from a Zen 4), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info['cpu family']} model {info['model']})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} x{torch.get_num_threads()} threads"


def run(loss: str, cases, providers: dict, nbytes, args) -> list:
    """cases: list of (case_name, make_inputs) with make_inputs() -> inputs;
    providers: name -> fn(inputs) running forward + backward; nbytes(inputs) -> bytes moved by an
    ideal fused pass (for GB/s). A provider that raises is reported as failed, not timed."""
    device = torch.device(args.device)
    makers = dict(cases)
    child = os.environ.get(_CHILD)
    if child:  # a fresh process measuring one CPU peak (see _peak_in_child)
        case, name = child.split("\t")
        inputs = makers[case]()
        fn = lambda: providers[name](inputs)  # noqa: E731
        fn()
        print(f"PEAK_MB {peak_memory_mb(fn, device)}")
        return []
    names = list(providers) if not args.providers else args.providers.split(",")
    rows = []
    total, done = len(cases) * len(names), 0
    # Phase 1 times every (case, provider), the providers of a case interleaved over --rounds;
    # phase 2 measures peak memory.
    for case, make in cases:
        live, results = {}, {}
        for name in names:
            inputs = make()
            fn = (lambda f, i: lambda: f(i))(providers[name], inputs)
            try:
                results[name] = _snapshot(fn())  # warm-up / compile; checked below
                fn()
            except Exception as exc:  # report and go on: one broken provider must not hide others
                print(f"[{loss}] {case} {name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            live[name] = (fn, inputs)
        checks = {}
        for name in live:
            ref = _reference_name(name, list(live))
            checks[name] = "" if ref is None else _agree(results[name], results[ref])
            if checks[name] not in ("", "ok"):
                print(f"[{loss}] {case} {name}: WRONG RESULT against {ref}: {checks[name]}",
                      file=sys.stderr, flush=True)
        results.clear()
        meds = {name: [] for name in live}
        for r in range(args.rounds):
            for name, (fn, _) in live.items():
                meds[name].append(time_ms(fn, device))
                if r == args.rounds - 1:
                    done += 1
                print(f"[{loss} {done}/{total}] {case} / {name} (round {r + 1}/{args.rounds}): "
                      f"{meds[name][-1][0]:.3f} ms", file=sys.stderr, flush=True)
        for name, (_, inputs) in live.items():
            ms = meds[name]
            if len(ms) == 1:
                med, p20, p80 = ms[0]
            else:
                med, p20, p80 = statistics.median(m[0] for m in ms), min(m[0] for m in ms), max(
                    m[0] for m in ms)
            gbs = nbytes(inputs) / (med * 1e-3) / 1e9
            rows.append(dict(loss=loss, case=case, provider=name, median_ms=med, p20_ms=p20,
                             p80_ms=p80, gb_per_s=gbs, peak_mb=float("nan"), check=checks[name],
                             device=device_name(device), date=datetime.date.today().isoformat(),
                             rounds=args.rounds, **machine(device), **versions()))
        del live
        gc.collect()
    for i, r in enumerate(rows):
        print(f"[{loss}] peak memory {i + 1}/{len(rows)}", file=sys.stderr, flush=True)
        if device.type == "cpu":
            r["peak_mb"] = _peak_in_child(r["case"], r["provider"])
        else:
            inputs = makers[r["case"]]()
            fn = lambda: providers[r["provider"]](inputs)  # noqa: E731
            fn()
            r["peak_mb"] = peak_memory_mb(fn, device)
            del inputs
            gc.collect()
    print_table(rows)
    if not args.no_save:
        save(loss, rows, device.type)
    return rows


def print_table(rows) -> None:
    """The markdown table; where a case has a "floor" provider (the memory traffic an ideal pass
    cannot avoid), each row also gives its time as a multiple of that floor."""
    floors = {r["case"]: r["median_ms"] for r in rows if r["provider"] == "floor"}
    extra = " x floor |" if floors else ""
    print("| case | provider | median ms (p20-p80) | vs first | GB/s | peak MiB |" + extra)
    print("|---|---|---|---|---|---|" + ("---|" if floors else ""))
    first = {}
    for r in rows:
        base = first.setdefault(r["case"], r["median_ms"])
        fl = floors.get(r["case"])
        tail = (f" {r['median_ms'] / fl:.2f} |" if fl else " |") if floors else ""
        flag = " (WRONG RESULT)" if r.get("check", "ok") not in ("", "ok") else ""
        print(f"| {r['case']} | {r['provider']}{flag} | {r['median_ms']:.2f} ({r['p20_ms']:.2f}-"
              f"{r['p80_ms']:.2f}) | {r['median_ms'] / base:.2f}x | {r['gb_per_s']:.1f} | "
              f"{r['peak_mb']:.0f} |" + tail)


def save(loss: str, rows, device_type: str) -> None:
    if not rows:
        return
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "results.csv")
    old, fields = [], list(rows[0])
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            # Columns added since older rows were written come last (empty in those rows).
            fields = list(reader.fieldnames or []) + [k for k in fields
                                                      if k not in (reader.fieldnames or [])]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(old + rows)
    with open(os.path.join(RESULTS, f"{loss}_{device_type}.json"), "w") as f:
        json.dump(rows, f, indent=1)


def fwd_bwd(loss_fn, *tensors_needing_grad):
    """A provider body: loss_fn() -> scalar loss; backward; clear the grads it produced. Returns
    the loss and those grads (for the check against the eager provider; the timing loops drop
    them at once)."""
    out = loss_fn()
    out.backward()
    grads = [t.grad for t in tensors_needing_grad]
    for t in tensors_needing_grad:
        t.grad = None
    return out.detach(), grads


def _snapshot(result):
    """A provider's (loss, grads) from fwd_bwd, copied in fp32 (an in-place provider reuses its
    buffers); None for what other providers return (the floor's tensors, a norm)."""
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], list)):
        return None
    out, grads = result
    half = any(t is not None and t.dtype in (torch.float16, torch.bfloat16) for t in [out, *grads])
    return out.float().clone(), [None if g is None else g.float().clone() for g in grads], half


def _reference_name(name: str, names):
    """The eager torch provider that `name` is checked against: "torch", "torch eager" or
    "eager formula", or "<group> torch" for a provider "<group> <other>" (bench_huber's
    "smooth_l1 torch.compile" -> "smooth_l1 torch"); None for the reference itself."""
    best = None
    for c in names:
        if c in ("torch", "torch eager", "eager formula"):
            prefix = ""
        elif c.endswith(" torch"):
            prefix = c[:-len("torch")]
        else:
            continue
        if c != name and name.startswith(prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), c)
    return None if best is None or name == best[1] else best[1]


def _agree(a, b) -> str:
    """"ok", or what differs between two providers' (loss, grads), within 3e-2 (half-precision
    results) or 2e-3 of the larger magnitude: loose, for a result that is wrong, not rounded."""
    if a is None or b is None:
        return ""
    rtol = 3e-2 if a[2] or b[2] else 2e-3
    pairs = [("loss", a[0], b[0])] + [(f"grad {i}", x, y) for i, (x, y) in
                                       enumerate(zip(a[1], b[1])) if x is not None and y is not None]
    for what, x, y in pairs:
        if x.shape != y.shape:
            return f"{what} shape {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = y.abs().max().item() if y.numel() else 0.0
        diff = (x - y).abs().max().item() if y.numel() else 0.0
        if not diff <= rtol * scale + 1e-30:  # (NaN fails)
            return f"{what} max |diff| {diff:.3g} vs max |ref| {scale:.3g}"
    return "ok"
