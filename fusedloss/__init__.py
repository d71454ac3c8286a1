"""fusedloss: fused, memory-lean, numerically safe loss kernels for PyTorch.

C++ kernels on the CPU, Triton kernels on CUDA, each loss one pass over its inputs, exposed as
drop-in functions (fusedloss.functional) and nn.Modules; plus a training-step helper
(fusedloss.TrainStep) and a vocab-parallel cross-entropy over torch.distributed.
"""
from ._extension import import_kernels_from_clone

import_kernels_from_clone(__name__, __path__[0])  # before anything imports fusedloss.kernels

from . import _backend, functional, reference, training  # noqa: E402,F401 (_backend: the ops)
from ._backend import backends, use_backend  # noqa: E402
from .distributed import VocabParallelCrossEntropyLoss
from .modules import (BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, SigmoidFocalLoss,
                      SmoothL1Loss, SoftmaxFocalLoss)
from .modules import DistillationLoss, KLDivLoss
from .training import TrainStep
from .linear_cross_entropy import LinearCrossEntropy, LinearCrossEntropyLoss  # noqa: E402
from ._backend import release_buffers  # noqa: E402

__version__ = "0.1.0"  # the one place: pyproject.toml reads it from here

__all__ = [
    "functional", "reference", "training",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "HuberLoss", "SmoothL1Loss",
    "SigmoidFocalLoss", "SoftmaxFocalLoss", "VocabParallelCrossEntropyLoss", "TrainStep",
    "backends", "use_backend", "release_buffers",
    "LinearCrossEntropy", "LinearCrossEntropyLoss",
    "KLDivLoss", "DistillationLoss",
]
