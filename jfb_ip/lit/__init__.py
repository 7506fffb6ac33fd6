"""Lightning glue: the one module for every method."""
from .module import ReconstructionModule, image_metrics

__all__ = ["ReconstructionModule", "image_metrics"]
