"""Embedded grayscale phantoms for CT and MRI: random-ellipse images made on the fly (no download).

Shepp-Logan-like in layout (a body ellipse, an optional bright rim, overlapping interior ellipses
of other intensities) but varied far beyond flat ellipses, so that what a model learns has a
chance to carry over to real slices (LoDoPaB-CT, fastMRI): a smooth intensity bias field, band-
limited texture of random grain and strength inside the body, small round details near the
resolution limit, thin elongated vessel-like structures, and blurred edges of random sharpness.
Each image is drawn at twice the resolution and averaged 2 x 2 (anti-aliased edges).

Validation and test images are fixed: image i of a split is generated from its own seed
(``seed`` + split offset + i), so they repeat exactly in every run and never coincide with each
other or with training images, which are fresh random draws from the global (seeded) RNG.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .images import DatasetError, check_channels, check_int

SPLITS = ("train", "val", "test")
_SPLIT_SEED = {"val": 1_000_003, "test": 2_000_003}


def _u(g: torch.Generator, lo: float, hi: float, n: int | None = None) -> Tensor | float:
    r = torch.rand(1 if n is None else n, generator=g, dtype=torch.float64)
    r = lo + (hi - lo) * r
    return float(r) if n is None else r


def _ellipse(xx: Tensor, yy: Tensor, cx, cy, a, b, angle, edge: float) -> Tensor:
    """Soft indicator of an ellipse (semi-axes a, b, rotated by ``angle``) on the grid: 1 inside,
    0 outside, a linear ramp of width ``edge`` (in grid units) across the boundary."""
    c, s = math.cos(angle), math.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / a
    v = (-(xx - cx) * s + (yy - cy) * c) / b
    r = torch.sqrt(u * u + v * v)
    # distance to the boundary is about (r - 1) * min(a, b) for the thin direction
    return ((1 - r) * min(a, b) / edge + 0.5).clamp(0, 1)


def _smooth_field(g: torch.Generator, n: int, cells: int) -> Tensor:
    """A smooth random field (n, n) of unit-order amplitude: a cells x cells Gaussian grid upsampled bicubically."""
    coarse = torch.randn(1, 1, cells, cells, generator=g, dtype=torch.float64)
    return F.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=True)[0, 0]


def _texture(g: torch.Generator, n: int, grain: float) -> Tensor:
    """Band-limited Gaussian noise (n, n) of unit std, correlated over about ``grain`` pixels."""
    w = torch.randn(n, n, generator=g, dtype=torch.float64)
    f = torch.fft.fftfreq(n, dtype=torch.float64)
    k2 = f[:, None] ** 2 + f[None, :] ** 2
    t = torch.fft.ifft2(torch.fft.fft2(w) * torch.exp(-2 * (math.pi * grain) ** 2 * k2)).real
    return t / t.std().clamp_min(1e-12)


def render_phantom(size: int, g: torch.Generator) -> Tensor:
    """One random phantom (1, size, size) in [0, 1], every draw from ``g``."""
    n = 2 * size  # supersampled, averaged 2 x 2 at the end
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    px = 2.0 / n  # one supersampled pixel in grid units
    edge = lambda: px * _u(g, 0.7, 3.0)  # noqa: E731 - edges from sharp to slightly blurred

    # body: a large ellipse, slightly off-centre and rotated
    ba, bb = _u(g, 0.62, 0.92), _u(g, 0.5, 0.88)
    bx, by, bang = _u(g, -0.06, 0.06), _u(g, -0.06, 0.06), _u(g, -0.4, 0.4)
    body = _ellipse(xx, yy, bx, by, ba, bb, bang, edge())
    img = _u(g, 0.2, 0.5) * body
    if _u(g, 0, 1) < 0.6:  # a bright rim (skull/cortex-like) of random thickness
        inner = _ellipse(xx, yy, bx, by, ba * _u(g, 0.86, 0.95), bb * _u(g, 0.86, 0.95), bang, edge())
        img = img + _u(g, 0.3, 0.55) * (body - inner)
        body = inner

    def inside() -> tuple[float, float]:
        # a point inside the body ellipse (uniform in a scaled copy of it)
        r, phi = math.sqrt(_u(g, 0, 1)) * 0.8, _u(g, 0, 2 * math.pi)
        u, v = r * ba * math.cos(phi), r * bb * math.sin(phi)
        c, s = math.cos(bang), math.sin(bang)
        return bx + u * c - v * s, by + u * s + v * c

    # organs / lesions: overlapping ellipses that raise or lower the intensity
    for _ in range(int(torch.randint(4, 13, (1,), generator=g))):
        cx, cy = inside()
        a = _u(g, 0.04, 0.35)
        img = img + _u(g, -0.25, 0.35) * _ellipse(xx, yy, cx, cy, a, a * _u(g, 0.3, 1.0), _u(g, 0, math.pi),
                                                  edge()) * body
    # fine round details near the resolution limit
    for _ in range(int(torch.randint(3, 16, (1,), generator=g))):
        cx, cy = inside()
        a = _u(g, 0.6, 3.0) * px * 2
        img = img + _u(g, -0.3, 0.4) * _ellipse(xx, yy, cx, cy, a, a * _u(g, 0.5, 1.0), _u(g, 0, math.pi), px)
    # thin elongated structures (vessels, septa)
    for _ in range(int(torch.randint(0, 6, (1,), generator=g))):
        cx, cy = inside()
        img = img + _u(g, 0.1, 0.35) * _ellipse(xx, yy, cx, cy, _u(g, 0.1, 0.45), _u(g, 0.7, 2.0) * px,
                                                _u(g, 0, math.pi), px) * body

    # smooth intensity variation (coil sensitivity / beam hardening-like bias) and texture
    bias = 1 + _u(g, 0.03, 0.2) * _smooth_field(g, n, int(torch.randint(3, 7, (1,), generator=g)))
    texture = _u(g, 0.0, 0.06) * _texture(g, n, _u(g, 0.5, 4.0))
    img = (img * bias + texture * body).clamp(0, None)
    img = F.avg_pool2d(img[None, None], 2)[0]
    return (img / max(float(img.max()), 1.0)).clamp(0, 1).float()


class Phantoms(Dataset):
    """Random-ellipse phantoms (see the module docstring).

    Args:
        split: 'train', 'val' or 'test'.
        image_size: side of the square images.
        channels: 1 (grayscale; CT and MRI) or 3 (the gray image in every channel).
        train_samples: phantoms per training epoch (>= 1), drawn afresh each time.
        eval_samples: fixed phantoms in the val and in the test split (>= 1).
        seed: base seed of the fixed val/test phantoms.
    """

    def __init__(self, split: str, image_size: int = 64, channels: int = 1, train_samples: int = 512,
                 eval_samples: int = 32, seed: int = 0):
        if split not in SPLITS:
            raise DatasetError(f"Phantoms: split must be one of {list(SPLITS)}, got {split!r}")
        self.split = split
        self.image_size = check_int("data.image_size", image_size, 8)
        self.channels = check_channels(channels)
        train_samples = check_int("data.dataset.train_samples", train_samples, 1)
        eval_samples = check_int("data.dataset.eval_samples", eval_samples, 1)
        self.seed = check_int("data.dataset.seed", seed, 0)
        self.length = train_samples if split == "train" else eval_samples
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def _make(self, seed: int) -> Tensor:
        img = render_phantom(self.image_size, torch.Generator().manual_seed(seed))
        return img.expand(self.channels, -1, -1).contiguous()

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        if self.split == "train":  # the global RNG is seeded per run and per worker by Lightning
            return self._make(int(torch.randint(2**62, (1,)))), i
        if i not in self._cache:
            self._cache[i] = self._make(self.seed + _SPLIT_SEED[self.split] + i)
        return self._cache[i], i
