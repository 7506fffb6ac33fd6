"""Embedded grayscale phantoms for CT and MRI: random-ellipse images made on the fly (no download).

Shepp-Logan-like in layout (a body ellipse, an optional bright rim, overlapping interior ellipses
of other intensities) but varied far beyond flat ellipses, so that what a model learns has a
chance to carry over to real slices (LoDoPaB-CT, fastMRI): a smooth intensity bias field, band-
limited texture of random grain and strength inside the body, small round details near the
resolution limit, thin elongated vessel-like structures, and blurred edges of random sharpness.
The default ``style="anatomy"`` adds what real slices show and ellipses lack: organ-like blobs with
wobbling boundaries and their own texture, curved vessels, close-ups where the body fills the frame,
a textured background and a random contrast curve (``style="ellipses"`` leaves them out).
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
STYLES = ("ellipses", "anatomy")
_SPLIT_SEED = {"val": 1_000_003, "test": 2_000_003}


def _u(g: torch.Generator, lo: float, hi: float, n: int | None = None) -> Tensor | float:
    r = torch.rand(1 if n is None else n, generator=g, dtype=torch.float64)
    r = lo + (hi - lo) * r
    return float(r) if n is None else r


def _rotated(xx: Tensor, yy: Tensor, cx, cy, angle) -> tuple[Tensor, Tensor]:
    """The grid in coordinates centred at (cx, cy) and rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    return (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c


def _ellipse(xx: Tensor, yy: Tensor, cx, cy, a, b, angle, edge: float) -> Tensor:
    """Soft indicator of an ellipse (semi-axes a, b, rotated by ``angle``) on the grid: 1 inside,
    0 outside, a linear ramp of width ``edge`` (in grid units) across the boundary."""
    u, v = _rotated(xx, yy, cx, cy, angle)
    u, v = u / a, v / b
    r = torch.sqrt(u * u + v * v)
    # distance to the boundary is about (r - 1) * min(a, b) for the thin direction
    return ((1 - r) * min(a, b) / edge + 0.5).clamp(0, 1)


def _blob(xx: Tensor, yy: Tensor, cx, cy, a, b, angle, edge: float, wobble: Tensor) -> Tensor:
    """Soft indicator of an organ-like blob: the ellipse of :func:`_ellipse` whose radius is modulated by a few
    low angular harmonics, r -> r (1 + sum_k w_k cos(k phi + p_k)), k = 2, 3, ...; ``wobble`` holds the (w_k, p_k)
    pairs, (n, 2)."""
    u, v = _rotated(xx, yy, cx, cy, angle)
    u, v = u / a, v / b
    phi = torch.atan2(v, u)
    scale = 1 + sum(float(w) * torch.cos((k + 2) * phi + float(p)) for k, (w, p) in enumerate(wobble))
    r = torch.sqrt(u * u + v * v) * scale.clamp_min(0.3)
    return ((1 - r) * min(a, b) / edge + 0.5).clamp(0, 1)


def _curve(xx: Tensor, yy: Tensor, cx, cy, length, width, angle, amp, freq, phase, edge: float) -> Tensor:
    """Soft indicator of a thin curved band (a vessel or septum): |v - amp sin(freq u + phase)| < width / 2 for
    |u| < length / 2, in coordinates rotated by ``angle`` about (cx, cy)."""
    u, v = _rotated(xx, yy, cx, cy, angle)
    d = (v - amp * torch.sin(freq * u + phase)).abs()
    return ((width / 2 - d) / edge + 0.5).clamp(0, 1) * ((length / 2 - u.abs()) / edge + 0.5).clamp(0, 1)


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


def render_phantom(size: int, g: torch.Generator, style: str = "anatomy") -> Tensor:
    """One random phantom (1, size, size) in [0, 1], every draw from ``g``.

    ``style="ellipses"``: the body ellipse with elliptic organs, round details, straight vessels, bias and
    texture. ``"anatomy"`` draws the same and more of what real slices show and ellipses lack, so that a
    reconstruction learned on phantoms carries over to real slices: organ-like blobs (ellipses with a wobbling
    boundary), curved vessels, organs with their own texture, a textured background (the body filling the frame
    in close-ups, as a cropped MR slice does), and a random contrast curve."""
    if style not in STYLES:
        raise DatasetError(f"Phantoms: style must be one of {list(STYLES)}, got {style!r}")
    anatomy = style == "anatomy"
    n = 2 * size  # supersampled, averaged 2 x 2 at the end
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 - 1
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    px = 2.0 / n  # one supersampled pixel in grid units
    edge = lambda: px * _u(g, 0.7, 3.0)  # noqa: E731 - edges from sharp to slightly blurred

    # body: a large ellipse, slightly off-centre and rotated; in close-ups (anatomy) it overflows the frame
    zoom = _u(g, 1.3, 2.4) if anatomy and _u(g, 0, 1) < 0.4 else 1.0
    ba, bb = _u(g, 0.62, 0.92) * zoom, _u(g, 0.5, 0.88) * zoom
    bx, by, bang = _u(g, -0.06, 0.06) * zoom, _u(g, -0.06, 0.06) * zoom, _u(g, -0.4, 0.4)
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

    def organ(cx, cy, a, b, angle) -> Tensor:
        if not anatomy:
            return _ellipse(xx, yy, cx, cy, a, b, angle, edge())
        wobble = torch.stack([_u(g, -0.12, 0.12, 4), _u(g, 0, 2 * math.pi, 4)], 1)
        return _blob(xx, yy, cx, cy, a, b, angle, edge(), wobble)

    # organs / lesions: overlapping ellipses (blobs) that raise or lower the intensity, some with their own grain
    for _ in range(int(torch.randint(4, 13, (1,), generator=g)) + (int(torch.randint(0, 8, (1,), generator=g))
                                                                   if anatomy else 0)):
        cx, cy = inside()
        a = _u(g, 0.04, 0.35) * (zoom if anatomy else 1.0)
        # drawn before the shape: this order keeps style="ellipses" the phantoms its documented figures used
        level = _u(g, -0.25, 0.35)
        shape = organ(cx, cy, a, a * _u(g, 0.3, 1.0), _u(g, 0, math.pi)) * body
        if anatomy and _u(g, 0, 1) < 0.5:
            level = level * (1 + _u(g, 0.1, 0.5) * _texture(g, n, _u(g, 0.5, 3.0)))
        img = img + level * shape
    # fine round details near the resolution limit
    for _ in range(int(torch.randint(3, 16, (1,), generator=g))):
        cx, cy = inside()
        a = _u(g, 0.6, 3.0) * px * 2
        img = img + _u(g, -0.3, 0.4) * _ellipse(xx, yy, cx, cy, a, a * _u(g, 0.5, 1.0), _u(g, 0, math.pi), px)
    # thin elongated structures (vessels, septa): straight, and curved in anatomy
    for _ in range(int(torch.randint(0, 6, (1,), generator=g))):
        cx, cy = inside()
        img = img + _u(g, 0.1, 0.35) * _ellipse(xx, yy, cx, cy, _u(g, 0.1, 0.45), _u(g, 0.7, 2.0) * px,
                                                _u(g, 0, math.pi), px) * body
    for _ in range(int(torch.randint(0, 7, (1,), generator=g)) if anatomy else 0):
        cx, cy = inside()
        img = img + _u(g, -0.2, 0.35) * _curve(xx, yy, cx, cy, _u(g, 0.2, 1.0), _u(g, 0.7, 2.5) * px,
                                               _u(g, 0, math.pi), _u(g, 0.02, 0.15), _u(g, 3, 15),
                                               _u(g, 0, 2 * math.pi), px) * body

    # smooth intensity variation (coil sensitivity / beam hardening-like bias) and texture
    bias = 1 + _u(g, 0.03, 0.2) * _smooth_field(g, n, int(torch.randint(3, 7, (1,), generator=g)))
    texture = _u(g, 0.0, 0.06) * _texture(g, n, _u(g, 0.5, 4.0))
    img = (img * bias + texture * body).clamp(0, None)
    if anatomy:
        # a faint textured background (air is not black in MR; tissue outside the body in close-ups), then a
        # random contrast curve
        outside = (1 - body).clamp(0, 1) * (_u(g, 0, 0.1) * (1 + _u(g, 0.2, 1.0) * _texture(g, n, _u(g, 1, 6))))
        img = img + outside.clamp(0, None) * (_u(g, 0, 1) < 0.5)
        img = img / max(float(img.max()), 1e-6)
        img = img.clamp(0, 1) ** _u(g, 0.7, 1.4)
    img = F.avg_pool2d(img[None, None], 2)[0]
    return (img / max(float(img.max()), 1.0)).clamp(0, 1).float()


class Phantoms(Dataset):
    """Random phantoms, anatomy-style or plain ellipses (see the module docstring).

    Args:
        split: 'train', 'val' or 'test'.
        image_size: side of the square images.
        channels: 1 (grayscale; CT and MRI) or 3 (the gray image in every channel).
        train_samples: phantoms per training epoch (>= 1), drawn afresh each time.
        eval_samples: fixed phantoms in the val and in the test split (>= 1).
        seed: base seed of the fixed val/test phantoms.
        style: "anatomy" or "ellipses" (:func:`render_phantom`).
    """

    def __init__(self, split: str, image_size: int = 64, channels: int = 1, train_samples: int = 512,
                 eval_samples: int = 32, seed: int = 0, style: str = "anatomy"):
        if split not in SPLITS:
            raise DatasetError(f"Phantoms: split must be one of {list(SPLITS)}, got {split!r}")
        self.split = split
        self.image_size = check_int("data.image_size", image_size, 8)
        self.channels = check_channels(channels)
        train_samples = check_int("data.dataset.train_samples", train_samples, 1)
        eval_samples = check_int("data.dataset.eval_samples", eval_samples, 1)
        self.seed = check_int("data.dataset.seed", seed, 0)
        if style not in STYLES:
            raise DatasetError(f"data.dataset.style must be one of {list(STYLES)}, got {style!r}")
        self.style = style
        self.length = train_samples if split == "train" else eval_samples
        self._cache: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def _make(self, seed: int) -> Tensor:
        img = render_phantom(self.image_size, torch.Generator().manual_seed(seed), self.style)
        return img.expand(self.channels, -1, -1).contiguous()

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        if self.split == "train":  # the global RNG is seeded per run and per worker by Lightning
            return self._make(int(torch.randint(2**62, (1,)))), i
        if i not in self._cache:
            self._cache[i] = self._make(self.seed + _SPLIT_SEED[self.split] + i)
        return self._cache[i], i
