"""The functional API, mirroring torch.nn.functional / torchvision.ops signatures."""
from .cross_entropy import cross_entropy
from .focal import sigmoid_focal_loss, softmax_focal_loss
from .distributed import vocab_parallel_cross_entropy

__all__ = ["cross_entropy", "sigmoid_focal_loss", "softmax_focal_loss", "vocab_parallel_cross_entropy"]
