"""The functional API, mirroring torch.nn.functional / torchvision.ops signatures."""
from .bce import binary_cross_entropy_with_logits
from .cross_entropy import cross_entropy
from .distributed import vocab_parallel_cross_entropy
from .focal import sigmoid_focal_loss, softmax_focal_loss
from .huber import huber_loss, smooth_l1_loss
from .linear_cross_entropy import linear_cross_entropy
from .kl_div import kl_div
from .distillation import distillation_loss

__all__ = ["cross_entropy", "binary_cross_entropy_with_logits", "huber_loss", "smooth_l1_loss",
           "sigmoid_focal_loss", "softmax_focal_loss", "vocab_parallel_cross_entropy",
           "linear_cross_entropy", "kl_div", "distillation_loss"]
