"""A small noise-conditioned UNet in the style of DRUNet (Zhang et al., "Plug-and-play image
restoration with deep denoiser prior", TPAMI 2021 = ref. [5] of Willingham et al. [4]), the prior
Q_theta(x, sigma) of Willingham et al. [4] §III-B: "a DRUNet that uses the noise-level-map as additional input"."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        H, W = x.shape[-2:]
        ph, pw = -H % self.multiple, -W % self.multiple
        inp = torch.cat([x, noise_level_map(sigma, x)], 1)
        if ph or pw:
            inp = F.pad(inp, (0, pw, 0, ph), mode="replicate")
        feats = [self.head(inp)]
        for down in self.down:
            feats.append(down(feats[-1]))
        h = self.body(feats[-1])
        for k in range(len(self.up) - 1, -1, -1):  # DRUNet adds each encoder level's output before going up
            h = self.up[k](h + feats[k + 1])
        out = self.tail(h + feats[0])[..., :H, :W]
        return x + out if self.residual else out
