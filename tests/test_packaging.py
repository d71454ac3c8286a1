"""Packaging, as the README installs fusedloss:

- pyproject.toml: metadata, extras, and no torch among the build requirements;
- `pip install .` (isolated: the build cannot import torch): a pure wheel with the Python code, the
  Triton kernels and the C++ sources, which compile on first import into a cache reused later;
- `pip install --no-build-isolation .`: a wheel with the extension built against this torch;
- `pip install -e .` (what .ci/setup runs) of a clone in a folder named fusedloss: it imports from
  the folder above the clone too;
- .ci/setup's check that skips the build when nothing changed.

Cost on 2 cores, about 40-60 s: the first-use compile here builds csrc/ops.cpp alone (the op
schemas: enough to see the mechanism; the full extension compiles in the same way, minutes), and
the wheel built against torch reuses build/ from .ci/setup, so ninja only links (without build/ it
compiles everything: a few minutes more).
"""
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fusedloss
from fusedloss import _extension

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VERSION = fusedloss.__version__


def run(args, cwd, **env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("FUSEDLOSS_BACKEND", "PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([str(a) for a in args], cwd=cwd, env={**base, **env},
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"{args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def copy_clone(dst: Path) -> Path:
    """The project's files as a fresh clone has them: no build outputs, no development link."""
    def ignore(folder, names):
        return [n for n in names
                if n in ("build", "dist", ".git", "__pycache__", ".pytest_cache", _extension.STAMP)
                or n.endswith((".egg-info", ".so"))
                or (Path(folder) == ROOT / "fusedloss" and n == "kernels")]
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """A PYTHONPATH entry under which `import torch` fails, as in pip's isolated build."""
    d = tmp_path_factory.mktemp("no_torch")
    (d / "torch").mkdir()
    (d / "torch" / "__init__.py").write_text('raise ImportError("torch is hidden, as in an '
                                             'isolated build")\n')
    return d


def wheel_contents(whl: Path) -> "set[str]":
    names = set(zipfile.ZipFile(whl).namelist())
    expected = ([f"fusedloss/{f.name}" for f in (ROOT / "fusedloss").glob("*.py")]
                + [f"fusedloss/kernels/{f.name}" for f in (ROOT / "kernels").glob("*.py")]
                + [f"fusedloss/csrc/{f.name}" for f in _extension.source_files(ROOT / "csrc")]
                + [f"fusedloss-{VERSION}.dist-info/licenses/LICENSE"])
    assert sorted(set(expected) - names) == [], f"missing from {whl.name}"
    return names


def test_pyproject_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # torch in the build requirements would make pip's isolated build download a second torch.
    assert not [r for r in meta["build-system"]["requires"] if re.match(r"torch\b", r)]
    project = meta["project"]
    assert project["name"] == "fusedloss" and project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"] and project["requires-python"].startswith(">=")
    assert [d for d in project["dependencies"] if re.match(r"torch\s*>=", d)]
    extras = project["optional-dependencies"]
    assert extras["triton"] == ["triton"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fusedloss.__version__"}
    licence = (ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause License" in licence and "fusedloss contributors" in licence
    # `bash .ci/setup test` installs the [test] extra's packages.
    wants = re.search(r'^\s*test\) wants="([^"]*)"', (ROOT / ".ci" / "setup").read_text(), re.M)
    assert {w.split(":")[1] for w in wants.group(1).split()} == set(extras["test"])


def test_isolated_build_wheel_compiles_on_first_import(tmp_path, no_torch):
    src = copy_clone(tmp_path / "src")
    run([PY, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", tmp_path / "wheels",
         src], cwd=tmp_path, PYTHONPATH=no_torch)
    (whl,) = (tmp_path / "wheels").glob("*.whl")
    assert whl.name == f"fusedloss-{VERSION}-py3-none-any.whl"  # pure: nothing compiled
    names = wheel_contents(whl)
    assert not [n for n in names if "/_C" in n]
    meta = zipfile.ZipFile(whl).read(f"fusedloss-{VERSION}.dist-info/METADATA").decode()
    for line in ("License-Expression: BSD-3-Clause", "License-File: LICENSE", f"Version: {VERSION}",
                 "Provides-Extra: triton", "Provides-Extra: test"):
        assert line in meta.splitlines()
    assert re.search(r"^Requires-Dist: torch>=", meta, re.M)

    # Installed and imported from elsewhere, it compiles the shipped sources on first import
    # (here only ops.cpp, which declares the ops, and python.cpp, the module, to keep the test
    # cheap) and reuses them later.
    site = tmp_path / "site"
    run([PY, "-m", "pip", "install", "--no-deps", "--target", site, whl], cwd=tmp_path)
    for f in (site / "fusedloss" / "csrc").glob("*.cpp"):
        if f.name not in ("ops.cpp", "python.cpp"):
            f.unlink()
    env = {"PYTHONPATH": str(site), "FUSEDLOSS_CACHE": str(tmp_path / "cache")}
    code = ("import torch, fusedloss; r = fusedloss.backends(); print(r['cpu']); "
            "print(r.reasons['cpu']); print(torch.ops.fusedloss.cross_entropy_fwd.default._schema); "
            "print(fusedloss.cross_entropy._direct.__module__)")
    first = run([PY, "-c", code], cwd=tmp_path, **env)
    assert "fusedloss: compiling the C++ kernels (2 files from" in first.stderr, first.stderr
    cpu, why, schema, module = first.stdout.splitlines()[-4:]
    assert cpu == "cpp" and "compiled on first use into" in why
    assert schema.startswith("fusedloss::cross_entropy_fwd(Tensor logits")
    assert module == "fusedloss._C"  # the library imported as the module, with its direct calls
    second = run([PY, "-c", code], cwd=tmp_path, **env)
    assert "compiling" not in second.stderr
    assert "compiled on first use, loaded from the cache" in second.stdout
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_no_build_isolation_wheel_holds_the_extension(tmp_path):
    # Built in the project folder, as pip builds a local folder: build/ keeps the objects.
    run([PY, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", tmp_path / "wheels",
         ROOT], cwd=ROOT)
    (whl,) = (tmp_path / "wheels").glob("*.whl")
    assert whl.name.startswith(f"fusedloss-{VERSION}-cp") and not whl.name.endswith("-any.whl")
    names = wheel_contents(whl)
    assert [n for n in names if re.fullmatch(r"fusedloss/_C\..*\.so", n)]
    info = json.loads(zipfile.ZipFile(whl).read(f"fusedloss/{_extension.STAMP}"))
    assert info["torch"] == torch.__version__
    assert info["sources"] == _extension.source_hash(ROOT / "csrc")

    site = tmp_path / "site"
    run([PY, "-m", "pip", "install", "--no-deps", "--target", site, whl], cwd=tmp_path)
    code = """
import torch, fusedloss
r = fusedloss.backends()
print(r["cpu"], "|", r.reasons["cpu"], "|", fusedloss.__file__)
x = torch.randn(8, 11, dtype=torch.float64, requires_grad=True)
t = torch.randint(0, 11, (8,))
fusedloss.functional.cross_entropy(x, t, label_smoothing=0.1).backward()
xr = x.detach().requires_grad_(True)
torch.nn.functional.cross_entropy(xr, t, label_smoothing=0.1).backward()
print((x.grad - xr.grad).abs().max().item())
"""
    out = run([PY, "-c", code], cwd=tmp_path, PYTHONPATH=site, FUSEDLOSS_CACHE=tmp_path / "cache")
    head, diff = out.stdout.splitlines()[-2:]
    cpu, why, where = head.split(" | ")
    assert cpu == "cpp" and "built at install time" in why, head
    assert where == str(site / "fusedloss" / "__init__.py")
    assert "compiling" not in out.stderr and not (tmp_path / "cache").exists()
    assert float(diff) < 1e-12
    # Under another torch the library is not loaded (here compiling anew is turned off).
    stamp = site / "fusedloss" / _extension.STAMP
    stamp.write_text(json.dumps({**info, "torch": "0.0.1"}))
    code = "import fusedloss; r = fusedloss.backends(); print(r['cpu'], '|', r.reasons['cpu'])"
    out = run([PY, "-c", code], cwd=tmp_path, PYTHONPATH=site, FUSEDLOSS_JIT="0")
    assert f"reference | plain PyTorch: fusedloss._C was built for torch 0.0.1, this is torch " \
           f"{torch.__version__}" in out.stdout, out.stdout


def test_editable_clone_named_fusedloss_imports_from_its_parent_folder(tmp_path, no_torch):
    clone = copy_clone(tmp_path / "fusedloss")
    # `pip install -e .` asks the build backend for an editable wheel (torch hidden: no compile).
    code = f"from setuptools import build_meta; build_meta.build_editable({str(tmp_path)!r})"
    run([PY, "-c", code], cwd=clone, PYTHONPATH=no_torch)
    (whl,) = tmp_path.glob("*.whl")
    zf = zipfile.ZipFile(whl)
    (pth,) = [n for n in zf.namelist() if n.endswith(".pth")]
    assert not [n for n in zf.namelist() if "finder" in n]  # no import hook: a plain path entry
    assert zf.read(pth).decode().split() == [str(clone.resolve())]
    site = tmp_path / "site"
    site.mkdir()
    (site / pth).write_bytes(zf.read(pth))

    # A script in the clone's parent folder, run from there. `python -S` and torch's folder as a
    # plain path entry: none of this environment's .pth files, which may install another copy.
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
    script = tmp_path / "use_fusedloss.py"
    script.write_text(f"""import site, sys
if sys.argv[1:] == ["installed"]:
    site.addsitedir({str(site)!r})  # what Python does with the .pth files in site-packages
sys.path.append({torch_dir!r})
import fusedloss
print(getattr(fusedloss, "__file__", None), getattr(fusedloss, "__version__", None))
if sys.argv[1:] == ["installed"]:
    import torch
    import fusedloss.kernels
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    err = (fusedloss.functional.cross_entropy(x, t) - torch.nn.functional.cross_entropy(x, t)).abs()
    print(fusedloss.kernels.__file__, err.item())
""")
    out = run([PY, "-S", script, "installed"], cwd=tmp_path, FUSEDLOSS_JIT="0")
    (line1, line2) = out.stdout.splitlines()[-2:]
    assert line1 == f"{clone / 'fusedloss' / '__init__.py'} {VERSION}"
    kernels, err = line2.split()
    assert kernels == str(clone / "kernels" / "__init__.py") and float(err) < 1e-12
    # Control: without that path entry Python finds the clone's folder itself, an empty namespace
    # package (setuptools' default editable install, an import hook asked after it, lost to it).
    bare = run([PY, "-S", script], cwd=tmp_path)
    assert bare.stdout.split() == ["None", "None"]


def test_build_check_sees_changed_sources_and_torch(tmp_path):
    root = tmp_path / "clone"
    (root / "fusedloss").mkdir(parents=True)
    shutil.copytree(ROOT / "csrc", root / "csrc")
    built, installed, why = _extension.build_status(root)
    assert not built and not installed and "not built yet" in why
    (root / "fusedloss" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    stamp = root / "fusedloss" / _extension.STAMP
    stamp.write_text(json.dumps(_extension.stamp(root / "csrc", torch.__version__)))
    assert _extension.build_status(root)[0]
    header = root / "csrc" / "common.h"
    text = header.read_text()
    header.write_text(text + "\n// edited\n")
    built, _, why = _extension.build_status(root)
    assert not built and "csrc/ changed" in why
    header.write_text(text)
    assert _extension.build_status(root)[0]
    (root / "csrc" / "new_loss.cpp").write_text("// a helper's new loss\n")
    assert not _extension.build_status(root)[0]
    (root / "csrc" / "new_loss.cpp").unlink()
    stamp.write_text(json.dumps(_extension.stamp(root / "csrc", "0.0.1")))
    built, _, why = _extension.build_status(root)
    assert not built and "built for torch 0.0.1" in why


def test_setup_does_nothing_when_up_to_date():
    built, installed, why = _extension.build_status(ROOT)
    if not (built and installed):  # .ci/setup would build and (re)point the editable install here
        pytest.skip(f"needs `bash .ci/setup test` run in this clone first: {why}")
    out = run(["bash", ROOT / ".ci" / "setup", "test"], cwd=ROOT, PYTHON=PY)
    assert "[setup] nothing to build" in out.stdout, out.stdout
    assert "compiling" not in out.stdout and "installing" not in out.stdout


def test_ninja_from_the_interpreters_folder(monkeypatch):
    """pip's ninja lands beside the interpreter (a venv's bin/), on PATH only in an activated venv:
    compiling puts that folder on PATH for its duration."""
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setenv("PATH", "/nowhere")
    with _extension.ninja_on_path():
        assert os.path.dirname(sys.executable) in os.environ["PATH"].split(os.pathsep)
    assert os.environ["PATH"] == "/nowhere"
