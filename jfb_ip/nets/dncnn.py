"""DnCNN (Zhang et al. 2017) as used in paper 000 §5.1 and paper 002 §4.1."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


class _Scale(nn.Module):
    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma

    def forward(self, w: Tensor) -> Tensor:
        return self.gamma * w


def lipschitz_conv(conv: nn.Conv2d, gamma: float) -> nn.Conv2d:
    """Spectral normalisation (Miyato et al. 2018) of the reshaped kernel, then a scale
    gamma < 1: the weight of every layer is W / ||W||_2 * gamma (paper 000 §5.1)."""
    conv = _spectral_norm(conv)
    parametrize.register_parametrization(conv, "weight", _Scale(gamma))
    return conv


class DnCNN(nn.Module):
    """conv-ReLU, (depth - 2) x [conv-(BN)-ReLU], conv.

    Args:
        in_channels / out_channels: image channels (out defaults to in).
        depth: number of conv layers (paper: 17).
        width: feature channels (paper: 64).
        batch_norm: BatchNorm after the middle convs (paper 000 uses it; it breaks the
            Lipschitz bound in training mode, so the contractive default is off).
        spectral_norm: normalise every conv, scaled by ``gamma`` (paper 000 §5.1).
        residual: return x - net(x) (the denoiser form) instead of net(x).
        bias: biases in the convs (paper 002 Table 3 counts a bias-free DnCNN).
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, depth: int = 17, width: int = 64,
                 batch_norm: bool = False, spectral_norm: bool = False, gamma: float = 1.0,
                 residual: bool = False, bias: bool = True):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNN: depth must be >= 2, got {depth}")
        out_channels = out_channels or in_channels
        if residual and out_channels != in_channels:
            raise ValueError("DnCNN: residual=True needs out_channels == in_channels")
        self.residual = residual

        def conv(cin, cout):
            c = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
            return lipschitz_conv(c, gamma) if spectral_norm else c

        layers: list[nn.Module] = [conv(in_channels, width), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers.append(conv(width, width))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
        layers.append(conv(width, out_channels))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x - out if self.residual else out


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters, counting a spectrally normalised weight once (its original)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
