"""The functional API, mirroring torch.nn.functional / torchvision.ops signatures."""
from .cross_entropy import cross_entropy
from .focal import sigmoid_focal_loss, softmax_focal_loss

__all__ = ["cross_entropy", "sigmoid_focal_loss", "softmax_focal_loss"]
