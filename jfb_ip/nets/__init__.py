"""Plain nn.Module regularisers (no physics, no Lightning)."""
from .dncnn import DnCNN, count_parameters, lipschitz_conv

__all__ = ["DnCNN", "count_parameters", "lipschitz_conv"]
