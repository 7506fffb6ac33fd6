"""DnCNN (Zhang et al. 2017) as used in Liu et al. [1] §5.1 and Guan et al. [3] §4.1."""
from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from .operator_norm import operator_norm_conv

NORM_MODES = ("kernel", "operator")


class _Scale(nn.Module):
    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma

    def forward(self, w: Tensor) -> Tensor:
        return self.gamma * w


def lipschitz_conv(conv: nn.Conv2d, gamma: float, mode: str = "kernel") -> nn.Conv2d:
    """Normalise a conv and scale it by gamma.

    mode="kernel": spectral normalisation (Miyato et al. 2018) of the reshaped kernel matrix,
        W / ||W||_2 * gamma, as §5.1 of Liu et al. [1] describes. This does NOT bound the convolution's
        operator norm: a 3x3 conv can exceed gamma by up to a factor 3 (the kernel side);
        measured on the trained default model: 1.3 to 2.2 for gamma = 0.99.
    mode="operator": :class:`ConvOperatorNorm`, the operator norm of the convolution itself at
        the layer's input size, so ||conv|| = gamma up to the power iteration's accuracy.
    """
    if mode not in NORM_MODES:
        raise ValueError(f"norm mode must be one of {NORM_MODES}, got {mode!r}")
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma < math.inf):
        # gamma = 0 would zero every normalised conv, a negative one flip it, NaN poison it
        raise ValueError(f"gamma={gamma!r}: the normalised convs' scale gamma must be a finite number > 0")
    if mode == "operator":
        return operator_norm_conv(conv, gamma)
    conv = _spectral_norm(conv)
    parametrize.register_parametrization(conv, "weight", _Scale(gamma))
    return conv


class DnCNN(nn.Module):
    """conv-ReLU, (depth - 2) x [conv-(BN)-ReLU], conv.

    Args:
        in_channels / out_channels: image channels (out defaults to in).
        depth: number of conv layers (paper: 17).
        width: feature channels (paper: 64).
        batch_norm: BatchNorm after the middle convs (Liu et al. [1] use it; it breaks the
            Lipschitz bound in training mode, so the contractive default is off).
        spectral_norm: normalise every conv, scaled by ``gamma`` (Liu et al. [1] §5.1).
        norm_mode: 'kernel' (the reshaped kernel matrix, Liu et al.'s [1] spectral norm: no Lipschitz
            bound on N) or 'operator' (each conv's true operator norm is gamma at the input size,
            so with ReLU, no BatchNorm in training mode, Lip(N) <= gamma^depth, and the DE-GRAD
            map is a contraction by Theorem 3.1 of Liu et al. [1]; biases do not matter).
        residual: return x - net(x) (the denoiser form) instead of net(x).
        bias: biases in the convs (Table 3 of Guan et al. [3] counts a bias-free DnCNN).
        padding_mode: the convs' padding, 'zeros' (Liu et al.'s [1] DnCNN) or 'circular'. With a circular
            forward operator (the deblur tasks) circular padding makes every pixel of a training crop an
            interior pixel: the network then behaves the same on a 48x48 crop and on a large photo,
            instead of spending most of a small crop's training signal on its zero-padded border.
        dilations: one dilation per conv (``depth`` values; None: all 1). IRCNN's 1,2,3,4,3,2,1 pattern
            widens the receptive field (8 layers: 17 -> 33 pixels) at the same cost and parameter count,
            which a deblurring prior needs: a 9x9 blur spreads each edge over 9 pixels.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, depth: int = 17, width: int = 64,
                 batch_norm: bool = False, spectral_norm: bool = False, gamma: float = 1.0,
                 residual: bool = False, bias: bool = True, norm_mode: str = "kernel", padding_mode: str = "zeros",
                 dilations: list[int] | None = None):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise ValueError(f"DnCNN: depth={depth!r} must be an integer >= 2")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"DnCNN: width={width!r} must be an integer >= 1")
        if norm_mode not in NORM_MODES:
            raise ValueError(f"DnCNN: norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")
        out_channels = out_channels or in_channels
        if residual and out_channels != in_channels:
            raise ValueError("DnCNN: residual=True needs out_channels == in_channels")
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"DnCNN: padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        dilations = [1] * depth if dilations is None else [int(d) for d in dilations]
        if len(dilations) != depth or min(dilations) < 1:
            raise ValueError(f"DnCNN: dilations must be {depth} integers >= 1 (one per conv), got {dilations}")
        self.residual = residual
        self.in_channels, self.out_channels = in_channels, out_channels
        dil = iter(dilations)

        def conv(cin, cout):
            d = next(dil)
            c = nn.Conv2d(cin, cout, 3, padding=d, dilation=d, bias=bias, padding_mode=padding_mode)
            return lipschitz_conv(c, gamma, norm_mode) if spectral_norm else c

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
