"""The functional API, mirroring torch.nn.functional / torchvision.ops signatures."""
from .cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
