"""fusedloss: fused, memory-lean, numerically safe loss kernels for PyTorch.

C++ kernels on the CPU, Triton kernels on CUDA, each loss one pass over its inputs, exposed as
drop-in functions (fusedloss.functional) and nn.Modules.
"""
from . import _backend, functional, reference
from .modules import CrossEntropyLoss
from .modules import SigmoidFocalLoss, SoftmaxFocalLoss
from .distributed import VocabParallelCrossEntropyLoss
from .modules import BCEWithLogitsLoss, HuberLoss, SmoothL1Loss
from . import training
from .training import TrainStep

__version__ = "0.1.0"

__all__ = ["functional", "reference", "CrossEntropyLoss", "SigmoidFocalLoss", "SoftmaxFocalLoss", "VocabParallelCrossEntropyLoss", "training", "TrainStep",
           "BCEWithLogitsLoss", "HuberLoss", "SmoothL1Loss"]
