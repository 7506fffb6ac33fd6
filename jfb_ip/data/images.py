"""Image datasets that yield clean images (C, H, W) in [0, 1] and their index.

The measurement is never made here: the LightningModule makes it on the training device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset path is missing or holds no images; the message says where files must be."""


def to_channels(img: Tensor, channels: int) -> Tensor:
    """uint8/float (C, H, W) with C in {1, 3, 4} -> float [0, 1] with ``channels`` channels."""
    img = v2.functional.to_dtype(img, torch.float32, scale=True)
    if img.shape[0] == 4:
        img = img[:3]
    if img.shape[0] == channels:
        return img
    if channels == 1:
        return v2.functional.rgb_to_grayscale(img)
    if img.shape[0] == 1:
        return img.expand(channels, -1, -1).clone()
    raise ValueError(f"cannot convert a {img.shape[0]}-channel image to {channels} channels")


def load_image(path: Path, channels: int) -> Tensor:
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        return to_channels(v2.functional.pil_to_tensor(im), channels)


def split_transform(split: str, image_size: int, resize: int | None = None) -> Callable[[Tensor], Tensor]:
    """Train: random crop (reflect-padded if the image is smaller) + flips.
    Val/test: optional resize of the shorter side, then a center crop: the same pixels every time."""
    ops: list = [v2.Resize(resize, antialias=True)] if resize else []
    if split == "train":
        ops += [v2.RandomCrop(image_size, pad_if_needed=True, padding_mode="reflect"),
                v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    else:
        ops += [v2.CenterCrop(image_size)]
    return v2.Compose(ops)


def ensure_min_size(img: Tensor, size: int) -> Tensor:
    """Upsample an image whose shorter side is below ``size`` (val/test center crops need it)."""
    return v2.functional.resize(img, size, antialias=True) if min(img.shape[-2:]) < size else img


class ImageFolder(Dataset):
    """Every image file directly under ``<root>/<split>`` (any size, RGB or grayscale).

    Images smaller than ``image_size`` are upsampled (val/test) or reflect-padded (train).
    """

    def __init__(self, split: str, image_size: int, root: str | Path | None = None, channels: int = 3,
                 resize: int | None = None):
        if root is None:
            raise DatasetNotFoundError("data=folder needs data.root=<dir> with images in <dir>/train, <dir>/val, <dir>/test")
        self.dir = Path(root).expanduser() / split
        if not self.dir.is_dir():
            raise DatasetNotFoundError(
                f"image folder split {split!r} not found: expected a directory {self.dir} holding PNG/JPEG files "
                f"(layout <root>/train, <root>/val, <root>/test; set data.root=<root>)")
        self.files = sorted(p for p in self.dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DatasetNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.dir}")
        self.image_size, self.channels, self.train = image_size, channels, split == "train"
        self.transform = split_transform(split, image_size, resize)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = load_image(self.files[i], self.channels)
        if not self.train:
            img = ensure_min_size(img, self.image_size)
        return self.transform(img).contiguous(), i


class CelebA(Dataset):
    """CelebA from its official layout, with the official split (paper 000 §5.1).

    ``<root>/celeba/img_align_celeba/*.jpg`` and ``<root>/celeba/list_eval_partition.txt``
    (lines ``<file> <0|1|2>`` for train/valid/test). Images are resized so the shorter side
    is ``resize`` (default image_size) and center-cropped to ``image_size`` (128 in the paper);
    training adds flips. ``limit`` keeps the first n files of the split (paper 000 used 10k).
    """

    SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, split: str, image_size: int = 128, root: str | Path | None = None, channels: int = 3,
                 resize: int | None = None, limit: int | None = None):
        if root is None:
            raise DatasetNotFoundError("data=celeba needs data.root=<dir> where <dir>/celeba/img_align_celeba/*.jpg "
                                       "and <dir>/celeba/list_eval_partition.txt exist")
        base = Path(root).expanduser() / "celeba"
        self.img_dir, part = base / "img_align_celeba", base / "list_eval_partition.txt"
        if not self.img_dir.is_dir() or not part.is_file():
            raise DatasetNotFoundError(
                f"CelebA not found under {base}: expected {self.img_dir}/*.jpg and {part} "
                f"(the official layout; set data.root to the folder that contains 'celeba/')")
        want = self.SPLITS[split]
        names = []
        for line in part.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and int(parts[1]) == want:
                names.append(parts[0])
        self.files = [self.img_dir / n for n in names][:limit]
        if not self.files:
            raise DatasetNotFoundError(f"CelebA split {split!r} is empty in {part}")
        missing = [f for f in self.files[:3] if not f.is_file()]
        if missing:
            raise DatasetNotFoundError(f"CelebA partition lists {missing[0].name} but {missing[0]} does not exist")
        self.channels = channels
        ops = [v2.Resize(resize or image_size, antialias=True), v2.CenterCrop(image_size)]
        if split == "train":
            ops.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(ops)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.files[i], self.channels)).contiguous(), i
