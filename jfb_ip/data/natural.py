"""Embedded natural images: scikit-image's bundled sample photos (no download ever).

Training draws random crops with flips from one set of photos; validation and test use
fixed crops of *other* photos that are never trained on.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import skimage.data
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .images import ensure_min_size, load_image, split_transform

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
        raise FileNotFoundError(f"scikit-image sample {path} is missing; reinstall scikit-image (make install)")
    return load_image(path, channels)


def grid_crops(img: Tensor, size: int, n: int) -> list[Tensor]:
    """n fixed size x size crops spread evenly over the non-overlapping tiles of ``img``."""
    H, W = img.shape[-2:]
    rows, cols = max(H // size, 1), max(W // size, 1)
    tiles = [(r, c) for r in range(rows) for c in range(cols)]
    step = max(len(tiles) / n, 1.0)
    picks = sorted({tiles[min(int(i * step), len(tiles) - 1)] for i in range(min(n, len(tiles)))})
    oy, ox = (H - rows * size) // 2, (W - cols * size) // 2
    return [img[:, oy + r * size: oy + (r + 1) * size, ox + c * size: ox + (c + 1) * size] for r, c in picks]


class NaturalImages(Dataset):
    """Args:
        split: 'train', 'val' or 'test'.
        image_size: crop side.
        channels: 3 (RGB) or 1 (grayscale).
        train_samples: random crops per training epoch.
        eval_crops: fixed crops per val/test split (spread over its photos).
    """

    def __init__(self, split: str, image_size: int = 48, channels: int = 3, train_samples: int = 512,
                 eval_crops: int = 32):
        if split not in NATURAL_SPLITS:
            raise ValueError(f"NaturalImages: split must be one of {list(NATURAL_SPLITS)}, got {split!r}")
        self.split, self.image_size = split, image_size
        self.images = [ensure_min_size(_load(n, channels), image_size) for n in NATURAL_SPLITS[split]]
        if split == "train":
            self.length = train_samples
            self.transform = split_transform("train", image_size)
        else:
            per_image = math.ceil(eval_crops / len(self.images))
            crops = [c for img in self.images for c in grid_crops(img, image_size, per_image)]
            self.crops = crops[:eval_crops]
            self.length = len(self.crops)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self.split == "train":
            img = self.images[int(torch.randint(len(self.images), (1,)))]
            return self.transform(img).contiguous(), i
        return self.crops[i].contiguous(), i
