"""Embedded natural images: scikit-image's bundled sample photos (no download ever).

Training draws random crops with flips from one set of photos; validation and test use
fixed crops of *other* photos that are never trained on.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import skimage.data
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .images import (DatasetError, DatasetNotFoundError, check_bool, check_channels, check_fraction, check_int,
                     check_zoom_out, ensure_min_size, load_image, split_transform)
from .synthetic import dead_leaves as draw_dead_leaves

log = logging.getLogger(__name__)

SKIMAGE_DIR = Path(skimage.data.__file__).parent

# Stereo pairs stay in one split so no test photo has a near-copy in training.
NATURAL_SPLITS = {
    "train": ["rocket.jpg", "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png",
              "retina.jpg", "camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png"],
    "val": ["chelsea.png"],
    "test": ["astronaut.png", "coffee.png"],
}


@lru_cache(maxsize=64)
def _load(name: str, channels: int) -> Tensor:
    path = SKIMAGE_DIR / name
    if not path.is_file():
        raise DatasetNotFoundError(f"scikit-image sample {path} is missing; reinstall scikit-image (make install)")
    return load_image(path, channels)


# disks smaller than this are finer than the blurs the tasks use; drawing them would only slow generation
DEAD_LEAVES_R_MIN = 2.0


def photo_palette(images: list[Tensor], n: int = 4096) -> Tensor:
    """``(C, n)`` colours of pixels drawn evenly from ``images`` (a fixed draw: the same palette every run)."""
    g = torch.Generator().manual_seed(0)
    cols = []
    for k, img in enumerate(images):
        flat = img.flatten(1)
        m = n // len(images) + (k < n % len(images))
        cols.append(flat[:, torch.randint(flat.shape[1], (m,), generator=g)])
    return torch.cat(cols, 1)


def n_tiles(img: Tensor, size: int) -> int:
    """How many non-overlapping size x size tiles ``img`` holds (what :func:`grid_crops` picks from)."""
    H, W = img.shape[-2:]
    return (H // size) * (W // size)


def grid_crops(img: Tensor, size: int, n: int) -> list[Tensor]:
    """min(n, tiles) fixed size x size crops spread evenly over the non-overlapping tiles of ``img``."""
    H, W = img.shape[-2:]
    if min(H, W) < size:
        raise ValueError(f"grid_crops: a {H}x{W} image holds no {size}x{size} crop; upsample it first "
                         f"(ensure_min_size)")
    rows, cols = H // size, W // size
    tiles = [(r, c) for r in range(rows) for c in range(cols)]
    step = max(len(tiles) / n, 1.0)
    picks = sorted({tiles[min(int(i * step), len(tiles) - 1)] for i in range(min(n, len(tiles)))})
    oy, ox = (H - rows * size) // 2, (W - cols * size) // 2
    return [img[:, oy + r * size: oy + (r + 1) * size, ox + c * size: ox + (c + 1) * size] for r, c in picks]


def share_crops(capacity: list[int], n: int) -> list[int]:
    """Split ``n`` crops over photos holding ``capacity`` tiles each: as evenly as the tiles allow,
    earlier photos taking the remainder (needs ``n <= sum(capacity)``)."""
    counts = [0] * len(capacity)
    while n > 0:
        for i, cap in enumerate(capacity):
            if n > 0 and counts[i] < cap:
                counts[i] += 1
                n -= 1
    return counts


class NaturalImages(Dataset):
    """Args:
        split: 'train', 'val' or 'test'.
        image_size: crop side.
        channels: 3 (RGB) or 1 (grayscale).
        train_samples: random crops per training epoch (>= 1).
        eval_crops: fixed, non-overlapping crops per val/test split, spread over its photos. Exactly
            this many are made; asking for more than the photos' tiles hold is a DatasetError.
        max_zoom_out: training crops see the photos downscaled by a random factor in [1, max_zoom_out]
            (:class:`~jfb_ip.data.images.RandomZoomOut`; 1: off).
        dead_leaves: the fraction of training crops that are generated dead-leaves images
            (:func:`~jfb_ip.data.synthetic.dead_leaves`, disks coloured like the training photos' pixels)
            instead of photo crops; 0: photos only.
        rot90, channel_shuffle: training crops also randomly transposed (all eight rotations and reflections
            with the flips) / their colour channels randomly reordered (:func:`~jfb_ip.data.images.split_transform`).

    The photos are embedded: there is no ``root`` (ImageDataModule rejects ``data.root``).
    Photos whose shorter side is below ``image_size`` are upsampled, with one logged warning.
    """

    def __init__(self, split: str, image_size: int = 48, channels: int = 3, train_samples: int = 512,
                 eval_crops: int = 32, max_zoom_out: float = 1.0, dead_leaves: float = 0.0, rot90: bool = False,
                 channel_shuffle: bool = False):
        if split not in NATURAL_SPLITS:
            raise DatasetError(f"NaturalImages: split must be one of {list(NATURAL_SPLITS)}, got {split!r}")
        self.split = split
        self.image_size = check_int("data.image_size", image_size, 1)
        channels = check_channels(channels)
        train_samples = check_int("data.dataset.train_samples", train_samples, 1)
        eval_crops = check_int("data.dataset.eval_crops", eval_crops, 1)
        max_zoom_out = check_zoom_out(max_zoom_out)
        rot90 = check_bool("data.dataset.rot90", rot90)
        channel_shuffle = check_bool("data.dataset.channel_shuffle", channel_shuffle)
        dead_leaves = check_fraction("data.dataset.dead_leaves", dead_leaves)
        names = NATURAL_SPLITS[split]
        photos = [_load(n, channels) for n in names]
        small = [f"{n} ({p.shape[-1]}x{p.shape[-2]})" for n, p in zip(names, photos) if min(p.shape[-2:]) < image_size]
        if small:
            log.warning("data.image_size=%d is larger than the %s photo(s) %s: upsampled", image_size, split,
                        ", ".join(small))
        self.images = [ensure_min_size(p, image_size) for p in photos]
        if split == "train":
            self.length = train_samples
            self.transform = split_transform("train", image_size, max_zoom_out=max_zoom_out, rot90=rot90,
                                             channel_shuffle=channel_shuffle)
            self.dead_leaves = dead_leaves
            self.palette = photo_palette(self.images) if self.dead_leaves else None
        else:
            capacity = [n_tiles(img, image_size) for img in self.images]
            if eval_crops > sum(capacity):
                per_photo = ", ".join(f"{n}: {c}" for n, c in zip(names, capacity))
                raise DatasetError(
                    f"data.dataset.eval_crops={eval_crops} but the {split} photos hold only {sum(capacity)} "
                    f"non-overlapping {image_size}x{image_size} crops ({per_photo}); set "
                    f"data.dataset.eval_crops<={sum(capacity)} or a smaller data.image_size")
            self.crops = [c for img, k in zip(self.images, share_crops(capacity, eval_crops)) if k
                          for c in grid_crops(img, image_size, k)]
            self.length = len(self.crops)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self.split == "train":
            if self.dead_leaves and float(torch.rand(())) < self.dead_leaves:
                return draw_dead_leaves(self.image_size, self.palette, r_min=DEAD_LEAVES_R_MIN), i
            img = self.images[int(torch.randint(len(self.images), (1,)))]
            return self.transform(img).contiguous(), i
        return self.crops[i].contiguous(), i
