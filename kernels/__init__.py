"""Triton kernels, one module per loss (installed as fusedloss.kernels).

They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests them).
Importing a submodule needs triton; this package itself imports nothing.
"""
