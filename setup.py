"""Builds fusedloss._C (the C++ CPU kernels) and installs the Triton kernels as fusedloss.kernels."""
import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="fusedloss",
    version="0.1.0",
    description="Fused, memory-lean, numerically safe loss kernels for PyTorch (C++ on CPU, Triton on GPU)",
    packages=["fusedloss", "fusedloss.kernels"],
    package_dir={"fusedloss": "fusedloss", "fusedloss.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "fusedloss._C",
            sorted(glob.glob("csrc/*.cpp")),
            # -fopenmp-simd: honour `#pragma omp simd` without linking an OpenMP runtime;
            # threading goes through at::parallel_for (torch's own pool).
            # -fno-trapping-math: nothing here reads FP exception flags, and without it gcc will
            # not vectorise the selects and min/max in fast_exp outside the AVX-512 clone.
            extra_compile_args=["-O3", "-fopenmp-simd", "-fno-trapping-math", "-std=c++17"],
            py_limited_api=False,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton"], "test": ["pytest", "numpy"]},
)
