"""Builds fusedloss._C (the C++ CPU kernels) and installs the Triton kernels as fusedloss.kernels.

The metadata lives in pyproject.toml. The extension is compiled against the torch this build can
import: `pip install --no-build-isolation .`, `pip install -e .` and .ci/setup. pip's default,
isolated build cannot import the installed torch (pyproject.toml does not list torch, so that pip
never downloads a second one): the wheel then holds the Python code and the C++ sources
(fusedloss/csrc), and fusedloss compiles those on first import (fusedloss/_extension.py).
"""
import glob
import importlib.util
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel

_spec = importlib.util.spec_from_file_location(
    "fusedloss_extension", Path(__file__).resolve().parent / "fusedloss" / "_extension.py")
ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ext)

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:
    torch = None
    ext.say(f"fusedloss: no torch in this build environment ({exc}): installing without the "
            "compiled C++ kernels; fusedloss compiles them on first import. To build them now, "
            "against the installed torch: pip install --no-build-isolation .")


class EditableWheel(editable_wheel):
    """`pip install -e .`: a .pth line puts the project root on sys.path (setuptools' "compat"
    mode) instead of setuptools' default import hook for the kernels/ -> fusedloss.kernels
    mapping. That hook is asked only after the normal path search, so a clone in a folder named
    `fusedloss`, seen from its parent folder, imported as an empty namespace package. In a clone,
    fusedloss/__init__.py maps kernels/ itself."""

    def finalize_options(self):
        super().finalize_options()
        if not self.mode:
            self.mode = "compat"
            warnings.filterwarnings("ignore", r"[\s\S]*Compat editable installs")


cmdclass = {"editable_wheel": EditableWheel}
ext_modules = []
if torch is not None:

    class BuildExt(BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                # setuptools builds editable installs in a new temporary folder, which recompiles
                # every file each time; build/ persists, so ninja recompiles only what changed.
                self.build_temp = os.path.join(
                    "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

        def run(self):
            super().run()
            # The stamp tells fusedloss at import (and .ci/setup) which torch and sources this
            # build is for; a library built for another torch is not loaded.
            info = json.dumps(ext.stamp("csrc", torch.__version__))
            dirs = {Path(self.build_lib, "fusedloss")}
            if self.inplace:
                dirs.add(Path(self.get_finalized_command("build_py").get_package_dir("fusedloss")))
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
                (d / ext.STAMP).write_text(info)

    cmdclass["build_ext"] = BuildExt
    ext_modules.append(CppExtension(
        "fusedloss._C", sorted(glob.glob("csrc/*.cpp")), extra_compile_args=ext.CXX_FLAGS,
        extra_link_args=ext.LD_FLAGS, py_limited_api=False))

with ext.ninja_on_path():  # BuildExtension looks for ninja when it is created
    setup(
        packages=["fusedloss", "fusedloss.kernels", "fusedloss.csrc"],
        package_dir={"fusedloss": "fusedloss", "fusedloss.kernels": "kernels",
                     "fusedloss.csrc": "csrc"},
        # The C++ sources ship in every wheel: to compile on first import where the build could not.
        package_data={"fusedloss.csrc": ["*.cpp", "*.h"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
