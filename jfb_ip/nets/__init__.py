"""Plain nn.Module regularisers (no physics, no Lightning)."""
from .dncnn import DnCNN, count_parameters, lipschitz_conv
from .luser import LUSERBlock
from .tnrd import TNRD
from .unet import NoiseConditionedUNet, UNet

__all__ = ["DnCNN", "LUSERBlock", "NoiseConditionedUNet", "TNRD", "UNet", "count_parameters", "lipschitz_conv"]
