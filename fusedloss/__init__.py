"""fusedloss: fused, memory-lean, numerically safe loss kernels for PyTorch.

C++ kernels on the CPU, Triton kernels on CUDA, each loss one pass over its inputs, exposed as
drop-in functions (fusedloss.functional) and nn.Modules; plus a training-step helper
(fusedloss.TrainStep) and a vocab-parallel cross-entropy over torch.distributed.
"""
from . import _backend, functional, reference, training  # noqa: F401  (_backend: loads the ops)
from .distributed import VocabParallelCrossEntropyLoss
from .modules import (BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, SigmoidFocalLoss,
                      SmoothL1Loss, SoftmaxFocalLoss)
from .modules import DistillationLoss, KLDivLoss
from .training import TrainStep

__version__ = "0.1.0"

__all__ = [
    "functional", "reference", "training",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "HuberLoss", "SmoothL1Loss",
    "SigmoidFocalLoss", "SoftmaxFocalLoss", "VocabParallelCrossEntropyLoss", "TrainStep",
    "KLDivLoss", "DistillationLoss",
]
