"""A small noise-conditioned UNet in the style of DRUNet (Zhang et al., "Plug-and-play image
restoration with deep denoiser prior", TPAMI 2021 = ref. [5] of Willingham et al. [4]), the prior
Q_theta(x, sigma) of Willingham et al. [4] §III-B: "a DRUNet that uses the noise-level-map as additional input"."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dncnn import lipschitz_conv


class ResBlock(nn.Module):
    """x + conv(relu(conv(x))): DRUNet's residual block ('CRC', no normalisation)."""

    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=bias), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def noise_level_map(sigma: Tensor | float, x: Tensor) -> Tensor:
    """The (B, 1, H, W) map holding each sample's noise std: a float, a 0-d tensor or a (B,) tensor."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() > 1 or (s.dim() == 1 and s.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"NoiseConditionedUNet: sigma must be a float or one value per sample ({x.shape[0]}), "
                         f"got shape {tuple(s.shape)}")
    return s.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[-2:])


def _unet_pass(net: nn.Module, x: Tensor) -> Tensor:
    """tail(...) of a UNet's head, down path, body and up path, where DRUNet adds each encoder level's output to the
    decoder's before going up (additive skips). Any H, W: ``x`` is padded on the bottom/right by replication to a
    multiple of ``net.multiple`` (as DRUNet's test code does) and the output cropped back."""
    H, W = x.shape[-2:]
    ph, pw = -H % net.multiple, -W % net.multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    feats = [net.head(x)]
    for down in net.down:
        feats.append(down(feats[-1]))
    h = net.body(feats[-1])
    for k in range(len(net.up) - 1, -1, -1):
        h = net.up[k](h + feats[k + 1])
    return net.tail(h + feats[0])[..., :H, :W]


class NoiseConditionedUNet(nn.Module):
    """``forward(x, sigma) -> x_denoised``: DRUNet's layout at a small size.

    Input: the image concatenated with its noise-level map (one channel, constant ``sigma`` per
    sample; DRUNet's conditioning). Head conv -> per level ``blocks`` residual blocks then a
    strided 2x2 conv (down), ``blocks`` residual blocks at the bottom, then per level a 2x2
    transposed conv (up) and ``blocks`` residual blocks, where the input of every up-step and of the
    tail conv is the decoder feature plus the encoder feature of the same level (DRUNet's additive
    skips, not concatenation). No normalisation layers; convs without bias by
    default (DRUNet is bias-free, which keeps the denoiser's output scaling with its input).

    Any H, W: the input is padded on the bottom/right by replication to a multiple of
    2**(len(features) - 1) (as DRUNet's test code does) and the output cropped back.

    Args:
        channels: image channels (in and out).
        features: feature channels per level (DRUNet: 64, 128, 256, 512); one down-sampling
            between consecutive levels.
        blocks: residual blocks per level (DRUNet: 4).
        bias: biases in every conv (DRUNet: none).
        residual: return x + net(x, sigma) (the network predicts the negative noise, DnCNN-style; an
            easier target on a small training budget) instead of DRUNet's direct output net(x, sigma).
    """

    def __init__(self, channels: int = 3, features: Sequence[int] = (32, 64, 128), blocks: int = 2,
                 bias: bool = False, residual: bool = True):
        super().__init__()
        features = [int(f) for f in features]
        if not features or min(features) < 1:
            raise ValueError(f"NoiseConditionedUNet: features must be a non-empty list of positive widths, "
                             f"got {features}")
        if int(blocks) < 0:
            raise ValueError(f"NoiseConditionedUNet: blocks must be >= 0, got {blocks}")
        if int(channels) < 1:
            raise ValueError(f"NoiseConditionedUNet: channels must be >= 1, got {channels}")
        self.channels, self.residual = int(channels), bool(residual)
        self.multiple = 2 ** (len(features) - 1)

        def stage(width: int) -> nn.Sequential:
            return nn.Sequential(*[ResBlock(width, bias) for _ in range(int(blocks))])

        self.head = nn.Conv2d(self.channels + 1, features[0], 3, padding=1, bias=bias)
        self.down = nn.ModuleList(
            nn.Sequential(stage(a), nn.Conv2d(a, b, 2, stride=2, bias=bias)) for a, b in zip(features, features[1:]))
        self.body = stage(features[-1])
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(b, a, 2, stride=2, bias=bias), stage(a))
            for a, b in zip(features, features[1:]))
        self.tail = nn.Conv2d(features[0], self.channels, 3, padding=1, bias=bias)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"NoiseConditionedUNet: expected images (B, {self.channels}, H, W), got shape "
                             f"{tuple(x.shape)}; set the net's channels to data.channels")
        out = _unet_pass(self, torch.cat([x, noise_level_map(sigma, x)], 1))
        return x + out if self.residual else out


class UNet(nn.Module):
    """A plain multi-scale regulariser for the equilibrium methods: DnCNN's conv-ReLU stages at
    ``len(features)`` resolutions, joined as in DRUNet (strided 2x2 conv down, transposed 2x2 conv up,
    each encoder level's features added back before going up; Zhang et al., TPAMI 2021).

    Same interface as :class:`~jfb_ip.nets.DnCNN` (``forward(x) -> net(x)``, in and out channels), so
    DE-GRAD takes it as ``method.net``. Where an 8-layer DnCNN sees 17 pixels, three levels with two
    convs each see 46 at about 1.3x its step time: a deblurring prior has to look past the 9x9 blur's
    support, which widening one scale by dilation did not give (docs/results.md, "What did not help").
    With ``spectral_norm`` every conv, strided and transposed included, is normalised by the spectral
    norm of its reshaped kernel and scaled by ``gamma``, as in DnCNN's 'kernel' mode (no Lipschitz
    bound on the network: the solver's convergence is measured, not assumed).

    Any H, W: the input is padded on the bottom/right by replication to a multiple of
    2**(len(features) - 1) and the output cropped back.

    Args:
        in_channels / out_channels: image channels (out defaults to in).
        features: feature channels per level, one down-sampling between consecutive levels.
        convs: conv-ReLU layers per level on the way down, at the bottom and on the way up.
        spectral_norm, gamma: normalise every conv (Miyato et al. [16]) and scale it by gamma.
        bias: biases in every conv.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, features: Sequence[int] = (32, 64, 128),
                 convs: int = 2, spectral_norm: bool = True, gamma: float = 1.0, bias: bool = True):
        super().__init__()
        features = [int(f) for f in features]
        if not features or min(features) < 1:
            raise ValueError(f"UNet: features must be a non-empty list of positive widths, got {features}")
        if isinstance(convs, bool) or not isinstance(convs, int) or convs < 0:
            raise ValueError(f"UNet: convs={convs!r} must be an integer >= 0")
        if int(in_channels) < 1:
            raise ValueError(f"UNet: in_channels must be >= 1, got {in_channels}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels or in_channels)
        self.multiple = 2 ** (len(features) - 1)

        def norm(c: nn.Module) -> nn.Module:
            return lipschitz_conv(c, gamma) if spectral_norm else c

        def stage(width: int) -> list[nn.Module]:
            out: list[nn.Module] = []
            for _ in range(convs):
                out += [norm(nn.Conv2d(width, width, 3, padding=1, bias=bias)), nn.ReLU(inplace=True)]
            return out

        self.head = nn.Sequential(norm(nn.Conv2d(self.in_channels, features[0], 3, padding=1, bias=bias)),
                                  nn.ReLU(inplace=True))
        self.down = nn.ModuleList(
            nn.Sequential(*stage(a), norm(nn.Conv2d(a, b, 2, stride=2, bias=bias)), nn.ReLU(inplace=True))
            for a, b in zip(features, features[1:]))
        self.body = nn.Sequential(*stage(features[-1]))
        self.up = nn.ModuleList(
            nn.Sequential(norm(nn.ConvTranspose2d(b, a, 2, stride=2, bias=bias)), nn.ReLU(inplace=True), *stage(a))
            for a, b in zip(features, features[1:]))
        self.tail = norm(nn.Conv2d(features[0], self.out_channels, 3, padding=1, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: expected (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        return _unet_pass(self, x)
