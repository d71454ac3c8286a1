"""Finding, checking and building the C++ extension fusedloss._C.

It imports only the standard library at module level: setup.py loads this file by path, in builds
where torch may not be importable, for the compile flags, the source hash and the build stamp.

How fusedloss._backend gets the CPU kernels (load()), in order:
1. fusedloss/_C*.so built at install time (`pip install --no-build-isolation .`, or the editable
   build of .ci/setup), provided its stamp (_C.build.json, written beside it) names this torch;
2. else the C++ sources shipped with the package (fusedloss/csrc in a wheel, csrc/ in a clone),
   compiled on first import with torch.utils.cpp_extension into a per-user cache, one directory per
   torch version, Python and hash of sources and flags, and loaded from there by later imports;
3. else nothing: the caller falls back to the reference implementation, with a warning.
"""
import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

# -O3. -fopenmp: at::parallel_for is an inline template that parallelises only where _OPENMP is
# defined (torch's CPU build uses OpenMP); without it every C++ kernel ran on one thread. The
# library then needs libgomp.so.1, which resolves to the copy torch has already loaded, so it
# shares torch's thread pool and torch.set_num_threads. -fno-trapping-math: nothing here reads FP exception
# flags, and without it gcc does not vectorise the selects and min/max in fast_exp outside the
# AVX-512 clone. No -std: torch's build helpers add the one its headers need (C++20 for torch
# 2.13); a different one after it draws warnings from those headers. No -march: csrc/common.h
# compiles the hot loops for several ISAs (target_clones) and picks one at run time, so one build
# runs on any x86-64.
# FUSEDLOSS_MAX_ISA=avx2 (set when building and when importing) leaves the AVX-512 clones out, so
# that the AVX2 code can be timed on an AVX-512 machine; =baseline builds only the portable code
# (what ARM and clang builds run), to test it on x86. Development options, not for wheels.
_MAX_ISA_FLAGS = {"avx2": ["-DFL_MAX_ISA_AVX2"], "baseline": ["-DFL_MAX_ISA_BASELINE"]}
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"] + _MAX_ISA_FLAGS.get(
    os.environ.get("FUSEDLOSS_MAX_ISA", "").lower(), [])
LD_FLAGS = ["-fopenmp"]
STAMP = "_C.build.json"  # beside the library: {"torch": version, "sources": hash, "python": tag}
JIT_NAME = "fusedloss_C"


def say(msg: str) -> None:
    """A progress line on stderr (stdout stays the user's)."""
    print(msg, file=sys.stderr, flush=True)


def import_kernels_from_clone(pkg_name: str, pkg_dir) -> None:
    """Installs put kernels/ inside the package (fusedloss/kernels); a clone has it beside the
    package. In a clone, import it as fusedloss.kernels from the clone itself, before anything else
    could answer for that name (e.g. another copy's editable install). kernels/__init__.py imports
    nothing, so this is cheap; with a fusedloss/kernels link in place the usual import works."""
    pkg_dir = Path(pkg_dir)
    init = pkg_dir.parent / "kernels" / "__init__.py"
    in_clone = init.is_file() and (pkg_dir.parent / "setup.py").is_file()
    if (pkg_dir / "kernels").is_dir() or not in_clone:
        return
    spec = importlib.util.spec_from_file_location(f"{pkg_name}.kernels", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[pkg_name], "kernels", module)


def csrc_dir(pkg_dir) -> "Path | None":
    """The C++ sources: fusedloss/csrc in an installed wheel, csrc/ beside the package in a
    clone."""
    pkg_dir = Path(pkg_dir)
    candidates = [pkg_dir / "csrc"]
    if (pkg_dir.parent / "setup.py").is_file():
        candidates.append(pkg_dir.parent / "csrc")
    for d in candidates:
        if any(d.glob("*.cpp")):
            return d
    return None


def source_files(csrc) -> "list[Path]":
    """Every C++ file of the extension: the translation units and the headers they share."""
    csrc = Path(csrc)
    return sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")], key=lambda p: p.name)


def source_hash(csrc) -> str:
    """sha256 over the compile flags and each source file's name and contents."""
    h = hashlib.sha256(json.dumps(CXX_FLAGS + LD_FLAGS).encode())
    for f in source_files(csrc):
        data = f.read_bytes()
        h.update(f"{f.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def stamp(csrc, torch_version: str) -> dict:
    return {"torch": str(torch_version), "sources": source_hash(csrc),
            "python": sys.implementation.cache_tag}


def read_stamp(lib_dir) -> "dict | None":
    try:
        return json.loads((Path(lib_dir) / STAMP).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def ninja_on_path():
    """torch.utils.cpp_extension runs `ninja` from PATH; pip's ninja package installs it beside the
    interpreter (a venv's bin/, which is on PATH only while the venv is activated)."""
    old = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        extra = [os.path.dirname(sys.executable)]
        try:
            import ninja

            extra.insert(0, ninja.BIN_DIR)
        except (ImportError, AttributeError):
            pass
        os.environ["PATH"] = os.pathsep.join(extra + [old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


def cache_root() -> Path:
    """FUSEDLOSS_CACHE, else $XDG_CACHE_HOME/fusedloss, else ~/.cache/fusedloss."""
    if os.environ.get("FUSEDLOSS_CACHE"):
        return Path(os.environ["FUSEDLOSS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusedloss"


def _load_prebuilt(pkg_dir: Path, csrc, torch_version: str):
    """(True, how) if fusedloss._C was built for this torch and now is loaded, else (False, why)."""
    try:
        spec = importlib.util.find_spec("fusedloss._C")
    except ImportError as exc:
        return False, f"fusedloss._C cannot be imported ({exc})"
    if spec is None or not spec.origin:
        return False, "fusedloss._C is not built"
    if Path(spec.origin).resolve().parent != pkg_dir.resolve():
        # e.g. another copy's editable install answering for a module that this copy lacks
        return False, f"fusedloss._C is not built here (the one found, {spec.origin}, belongs to " \
                      "another copy of fusedloss)"
    info = read_stamp(pkg_dir) or {}
    built_for = info.get("torch")
    if built_for and built_for != torch_version:  # the exact build: the C++ ABI is torch's
        return False, f"fusedloss._C was built for torch {built_for}, this is torch {torch_version}"
    try:
        importlib.import_module("fusedloss._C")
    except ImportError as exc:  # e.g. undefined symbols: built against another torch
        return False, f"fusedloss._C does not load ({exc})"
    in_clone = csrc is not None and csrc.parent != pkg_dir
    how = f"fusedloss._C, built {'in this clone' if in_clone else 'at install time'}"
    if built_for:
        how += f" for torch {built_for}"
    if in_clone and info.get("sources") and info["sources"] != source_hash(csrc):
        how += f"; {csrc} changed since: rebuild it"
        warnings.warn(f"fusedloss: fusedloss._C was built from other sources than {csrc} holds "
                      "now; rebuild it (bash .ci/setup, or python3 setup.py build_ext --inplace)",
                      RuntimeWarning, stacklevel=4)
    return True, how


def _import_as_c(lib: Path) -> None:
    """Import the library compiled on first use as the module fusedloss._C, as a built one is
    (its PyInit__C: the module's direct entry points, csrc/python.cpp); loading it runs the op
    registrations, once per process whichever name loads it first."""
    loader = importlib.machinery.ExtensionFileLoader("fusedloss._C", str(lib))
    spec = importlib.util.spec_from_file_location("fusedloss._C", str(lib), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["fusedloss._C"] = module


def _compile_and_load(csrc: Path, torch_version: str) -> str:
    """Load the extension compiled from csrc for this torch from the cache; compile it first if
    the cache does not have it. Returns how it was loaded."""
    import torch
    from torch.utils import cpp_extension

    build_dir = cache_root() / f"torch-{torch_version}-{sys.implementation.cache_tag}-" \
                               f"{source_hash(csrc)[:16]}"
    lib = build_dir / f"{JIT_NAME}{cpp_extension.LIB_EXT}"
    done = build_dir / STAMP  # written once a build loaded; a half-linked library has none
    if lib.is_file() and done.is_file():
        _import_as_c(lib)
        return f"compiled on first use, loaded from the cache {build_dir}"
    units = sorted(csrc.glob("*.cpp"))
    build_dir.mkdir(parents=True, exist_ok=True)
    files = f"{len(units)} file{'s' * (len(units) > 1)}"
    say(f"fusedloss: compiling the C++ kernels ({files} from {csrc}, for torch {torch_version}) "
        f"into {build_dir}. This takes a few minutes, once: later imports reuse them. "
        "(`pip install --no-build-isolation .` builds them at install time instead.)")
    t0 = time.perf_counter()
    with ninja_on_path():
        # Loads the library too (torch.ops.load_library), which registers the ops.
        cpp_extension.load(name=JIT_NAME, sources=[str(u) for u in units],
                           extra_cflags=CXX_FLAGS, extra_ldflags=LD_FLAGS,
                           extra_include_paths=[str(csrc)],
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
    _import_as_c(lib)
    done.write_text(json.dumps(stamp(csrc, torch_version)))
    say(f"fusedloss: compiled in {time.perf_counter() - t0:.0f} s")
    return f"compiled on first use into {build_dir}"


def load(pkg_dir):
    """Register the C++ ops: (True, how they were obtained) or (False, why not)."""
    import torch

    pkg_dir = Path(pkg_dir)
    csrc = csrc_dir(pkg_dir)
    ok, msg = _load_prebuilt(pkg_dir, csrc, str(torch.__version__))
    if ok:
        return True, msg
    if os.environ.get("FUSEDLOSS_JIT", "1").strip() == "0":
        return False, f"{msg}; FUSEDLOSS_JIT=0 turns off compiling it on first use"
    if csrc is None:
        return False, f"{msg}, and there are no C++ sources beside the package to compile"
    try:
        return True, _compile_and_load(csrc, str(torch.__version__))
    except Exception as exc:  # no compiler, no ninja, a compile error: still usable, slower
        text = str(exc).strip()
        return False, f"{msg}, and compiling it on first use failed: " \
                      f"{text if len(text) < 2000 else '...' + text[-2000:]}"


def build_status(root) -> "tuple[bool, bool, str]":
    """For .ci/setup: (extension up to date, editable install of root, what it found).

    Up to date: fusedloss/_C*.so in the clone at root, stamped with this torch and the hash of
    csrc/ as it is now.
    """
    import importlib.metadata

    import torch

    root = Path(root).resolve()
    pkg = root / "fusedloss"
    libs = [s for s in importlib.machinery.EXTENSION_SUFFIXES if (pkg / f"_C{s}").is_file()]
    info = read_stamp(pkg)
    if not libs:
        built, why = False, "fusedloss._C is not built yet"
    elif info is None:
        built, why = False, f"fusedloss._C has no build stamp ({STAMP})"
    elif info.get("torch") != str(torch.__version__):
        built, why = False, f"fusedloss._C was built for torch {info.get('torch')}, " \
                            f"this is torch {torch.__version__}"
    elif info.get("sources") != source_hash(root / "csrc"):
        built, why = False, "csrc/ changed since fusedloss._C was built"
    else:
        built = True
        why = f"fusedloss._C is up to date (csrc/ unchanged, torch {torch.__version__})"
    # The installed distribution, looked up outside the clone (its own fusedloss.egg-info would
    # answer first from the current directory).
    here = {str(root), "", os.getcwd()}
    dist = next(iter(importlib.metadata.distributions(
        name="fusedloss", path=[p for p in sys.path if p not in here])), None)
    url = json.loads((dist.read_text("direct_url.json") if dist else None) or "{}")
    installed = bool(url.get("dir_info", {}).get("editable")) and url.get("url") == root.as_uri()
    why += "; installed in editable mode from here" if installed else \
        "; fusedloss is not installed in editable mode from here"
    return built, installed, why
