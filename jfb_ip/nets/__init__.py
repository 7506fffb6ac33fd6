"""Plain nn.Module regularisers (no physics, no Lightning)."""
from .dncnn import DnCNN, count_parameters, lipschitz_conv
from .luser import LUSERBlock

__all__ = ["DnCNN", "LUSERBlock", "count_parameters", "lipschitz_conv"]
