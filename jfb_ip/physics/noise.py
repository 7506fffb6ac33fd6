"""Seeded Gaussian noise: every random draw takes a generator, or one seed per sample so
that validation/test measurements repeat exactly whatever the batch size."""
from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import per_sample


def randn_like(x: Tensor, generator: torch.Generator | None = None, seeds: Tensor | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``; with ``seeds`` (B,) sample i uses its own seed."""
    if seeds is None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = torch.empty_like(x)
    for i, s in enumerate(seeds.tolist()):
        g = torch.Generator(device=x.device).manual_seed(int(s))
        out[i] = torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
    return out


def gaussian_noise(y: Tensor, sigma: Tensor, generator=None, seeds=None, support: Tensor | None = None) -> Tensor:
    """y + sigma * n, with sigma per sample (B,); ``support`` (broadcast to y): 0 where y is not measured
    (a dropped pixel, an unsampled k-space column), so no noise lands there."""
    noise = randn_like(y, generator, seeds)
    if support is not None:
        noise = noise * support.to(device=y.device, dtype=y.dtype)
    return y + per_sample(sigma, y) * noise
