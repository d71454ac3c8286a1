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


class SigmoidFocalLoss(nn.Module):
    """Module form of fusedloss.functional.sigmoid_focal_loss (torchvision's formula); the
    normalizer, when needed, is passed per call."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = resolve_reduction(reduction)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, normalizer=None) -> torch.Tensor:
        return F.sigmoid_focal_loss(inputs, targets, alpha=self.alpha, gamma=self.gamma,
                                    reduction=self.reduction, normalizer=normalizer)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class SoftmaxFocalLoss(nn.Module):
    """Module form of fusedloss.functional.softmax_focal_loss; a per-class alpha is a buffer."""

    def __init__(self, gamma: float = 2.0, alpha=None, ignore_index: int = -100,
                 reduction: str = "mean"):
        super().__init__()
        self.gamma = gamma
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = resolve_reduction(reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.softmax_focal_loss(input, target, gamma=self.gamma, alpha=self.alpha,
                                    ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        s = f"gamma={self.gamma}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        if self.alpha is not None and not isinstance(self.alpha, torch.Tensor):
            s += f", alpha={self.alpha}"
        return s


class BCEWithLogitsLoss(nn.Module):
    """Drop-in for torch.nn.BCEWithLogitsLoss; weight and pos_weight are buffers."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean",
                 pos_weight=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = resolve_reduction(reduction, size_average, reduce)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight,
                                                  pos_weight=self.pos_weight,
                                                  reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class HuberLoss(nn.Module):
    """Drop-in for torch.nn.HuberLoss."""

    def __init__(self, reduction="mean", delta=1.0):
        super().__init__()
        self.reduction = resolve_reduction(reduction)
        self.delta = delta

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, delta={self.delta}"


class SmoothL1Loss(nn.Module):
    """Drop-in for torch.nn.SmoothL1Loss."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", beta=1.0):
        super().__init__()
        self.reduction = resolve_reduction(reduction, size_average, reduce)
        self.beta = beta

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, beta={self.beta}"


class KLDivLoss(nn.Module):
    """Drop-in for torch.nn.KLDivLoss (input log-probabilities; reduction 'batchmean' is the KL
    divergence per sample; 'mean' warns as torch's)."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", log_target=False):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = resolve_reduction("mean", size_average, reduce)
        self.reduction = reduction
        self.log_target = log_target

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, log_target={self.log_target}"


class DistillationLoss(nn.Module):
    """Module form of fusedloss.functional.distillation_loss: holds temperature, beta,
    hard_weight, ignore_index, reduction and inplace_backward; called as
    loss_fn(student_logits, teacher_logits, target=None)."""

    def __init__(self, temperature=1.0, beta=0.0, ignore_index=-100, reduction="batchmean",
                 hard_weight=0.0, *, inplace_backward=False):
        super().__init__()
        self.temperature = temperature
        self.beta = beta
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.hard_weight = hard_weight
        self.inplace_backward = inplace_backward

    def forward(self, student_logits, teacher_logits, target=None):
        return F.distillation_loss(student_logits, teacher_logits, target,
                                   temperature=self.temperature, beta=self.beta,
                                   ignore_index=self.ignore_index, reduction=self.reduction,
                                   hard_weight=self.hard_weight,
                                   inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        s = (f"temperature={self.temperature}, beta={self.beta}, "
             f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
        if self.hard_weight:
            s += f", hard_weight={self.hard_weight}"
        if self.inplace_backward:
            s += ", inplace_backward=True"
        return s


from .linear_cross_entropy import LinearCrossEntropy, LinearCrossEntropyLoss  # noqa: E402,F401
