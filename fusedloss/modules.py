"""nn.Module losses: they hold options and call the functional, nothing else."""
import torch
from torch import nn

from . import functional as F
from ._common import resolve_reduction


class CrossEntropyLoss(nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss; extras z_loss and inplace_backward (keyword-only)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, inplace_backward=False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = resolve_reduction(reduction, size_average, reduce)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        s = f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        if self.label_smoothing:
            s += f", label_smoothing={self.label_smoothing}"
        if self.z_loss:
            s += f", z_loss={self.z_loss}"
        if self.inplace_backward:
            s += ", inplace_backward=True"
        return s
