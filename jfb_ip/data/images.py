"""Image datasets that yield clean images (C, H, W) in [0, 1] and their index.

The measurement is never made here: the LightningModule makes it on the training device.

Bad input fails early and names its cause: every data problem a user can fix raises
:class:`DatasetError` (a ``ValueError``) whose message names the file or config key and the fix.
``ImageDataModule.validate`` calls each dataset's ``check()`` before training.
"""
from __future__ import annotations

import functools
import logging
import os
from numbers import Integral
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm"}


class DatasetError(ValueError):
    """A data problem the user can fix: an unreadable file, a bad layout or a bad ``data.*`` value.

    The message names the file or config key and says what to do. It is built from one message
    string only: PyTorch re-raises an exception from a DataLoader worker as ``type(msg)``, so this
    type (not a generic RuntimeError) reaches the caller when ``num_workers > 0``.
    """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset path is missing or holds no images; the message says where files must be."""


def check_int(key: str, value: object, minimum: int, allow_none: bool = False) -> int | None:
    """``value`` if it is an integer >= ``minimum`` (or None when allowed), else a DatasetError naming ``key``."""
    if value is None and allow_none:
        return None
    # bool is an int subclass: data.channels=true must not pass as 1
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        also = " or null" if allow_none else ""
        raise DatasetError(f"{key}={value!r} is invalid: it must be an integer >= {minimum}{also}")
    return int(value)


def check_fraction(key: str, value: object) -> float:
    """``value`` if it is a number in [0, 1], else a DatasetError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DatasetError(f"{key}={value!r} is invalid: it must be a number in [0, 1]")
    return float(value)


def check_bool(key: str, value: object) -> bool:
    """``value`` if it is true or false, else a DatasetError naming ``key``."""
    if not isinstance(value, bool):
        raise DatasetError(f"{key}={value!r} is invalid: use true or false")
    return value


def check_channels(channels: object) -> int:
    """1 (grayscale) or 3 (RGB): the only channel counts the images are converted to."""
    if isinstance(channels, bool) or channels not in (1, 3):
        raise DatasetError(f"data.channels={channels!r} is invalid: use data.channels=3 (RGB) or "
                           f"data.channels=1 (grayscale)")
    return int(channels)


def check_resize(resize: object, image_size: int) -> int | None:
    """``data.dataset.resize`` (shorter side before cropping): null, or an integer >= image_size.

    A smaller value would leave the center crop larger than the image, which torchvision fills with
    black borders without a word.
    """
    resize = check_int("data.dataset.resize", resize, 1, allow_none=True)
    if resize is not None and resize < image_size:
        raise DatasetError(f"data.dataset.resize={resize} is smaller than data.image_size={image_size}: the "
                           f"{image_size}x{image_size} crops would be padded with black borders; set "
                           f"data.dataset.resize>={image_size} or null")
    return resize


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


# Pillow's single-channel modes of more than 8 bits. ``convert("L"/"RGB")`` clips them at 255
# (a 16-bit PNG turns pure white), so they are scaled by their own white level instead.
_UNSIGNED_16 = {"I;16", "I;16L", "I;16B", "I;16N"}


def _white_level(im: Image.Image, path: Path) -> float | None:
    """The pixel value of full white for a high bit-depth image, None for an 8-bit mode."""
    if im.mode in _UNSIGNED_16:
        return 65535.0
    if im.mode == "I":  # 32-bit integer pixels: the bit depth comes from the file format
        if im.format == "TIFF":
            bits = im.tag_v2.get(258)  # BitsPerSample
            bits = bits[0] if isinstance(bits, tuple) else bits
            if bits:
                return float(2 ** int(bits) - 1)
        if im.format in ("PNG", "PPM"):  # at most 16 bits; Pillow scales a PGM's maxval to 65535
            return 65535.0
        raise DatasetError(f"cannot tell the bit depth of {path} ({im.format} with 32-bit integer pixels); "
                           f"save it as an 8- or 16-bit PNG")
    if im.mode == "F":  # floating point: no bit depth, the values must already be intensities
        return 1.0
    if im.mode.startswith(("I;", "F;")):
        raise DatasetError(f"{path} has the unsupported pixel mode {im.mode!r}; save it as an 8- or 16-bit PNG")
    return None


def _decoded_to_tensor(im: Image.Image, path: Path, channels: int) -> Tensor:
    white = _white_level(im, path)
    if white is None:
        im = im.convert("L" if channels == 1 else "RGB")
        return to_channels(v2.functional.pil_to_tensor(im), channels)
    arr = np.asarray(im, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > white:
        kind = "float" if im.mode == "F" else f"{im.mode} ({white:.0f} is white)"
        raise DatasetError(f"{path}: {kind} pixel values span [{lo:g}, {hi:g}], outside [0, {white:g}]; "
                           f"save it as an 8- or 16-bit PNG")
    return to_channels(torch.from_numpy(arr / white).float()[None], channels)


def load_dicom(path: Path, channels: int) -> Tensor:
    """One grayscale DICOM slice (CT, MR, ...) as float (channels, H, W) in [0, 1]: the stored values through the
    file's rescale (CT: Hounsfield units), then scaled by the slice's own range, min -> 0 and max -> 1 (a DICOM
    slice has no white level; its window is a display choice)."""
    import pydicom
    from pydicom.pixels import apply_rescale

    try:
        ds = pydicom.dcmread(path)
        arr = np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float64)
    except FileNotFoundError:
        raise
    except Exception as e:  # pydicom raises many types (InvalidDicomError, NotImplementedError for a codec, ...)
        raise DatasetError(f"cannot read DICOM slice {path}: {type(e).__name__}: {e}; replace or remove the "
                           f"file") from e
    if arr.ndim != 2:
        raise DatasetError(f"{path}: a DICOM file of one grayscale slice is expected, got pixel data of shape "
                           f"{arr.shape} ({ds.get('SamplesPerPixel', 1)} samples per pixel, "
                           f"{ds.get('NumberOfFrames', 1)} frames); export single slices")
    lo, hi = float(arr.min()), float(arr.max())
    if not hi > lo:
        raise DatasetError(f"{path}: the slice is constant ({lo:g}): nothing to reconstruct")
    return to_channels(torch.from_numpy((arr - lo) / (hi - lo)).float()[None], channels)


def load_image(path: Path, channels: int) -> Tensor:
    """Fully decode ``path`` into float (channels, H, W) in [0, 1].

    8-bit files (any Pillow mode: gray, RGB, palette, RGBA, CMYK...) go through Pillow's
    ``convert``. 16-bit (``I;16``, ``I;16B``...) and 32-bit integer (``I``) images are scaled by
    their bit depth, float (``F``) images must lie in [0, 1]. 16-bit RGB PNGs are read by Pillow
    at 8-bit precision (correctly scaled). DICOM files (``.dcm``): :func:`load_dicom`. Any failure
    raises DatasetError naming the file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".dcm":
            return load_dicom(path, channels)
        with Image.open(path) as im:
            im.load()  # decode everything now: a truncated file fails here, with its path
            return _decoded_to_tensor(im, path, channels)
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"image {path} does not exist (moved or deleted after the dataset "
                                   f"was listed?)") from e
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}; replace or remove the file") from e


def ensure_min_size(img: Tensor, size: int, reflect_pad: bool = False) -> Tensor:
    """Upsample ``img`` (shorter side to ``size``) when a ``size`` x ``size`` crop cannot be taken.

    Center crops (val/test) need both sides >= ``size``. Random training crops are reflect-padded
    instead (``reflect_pad=True``), but torchvision's ``RandomCrop(pad_if_needed=True)`` pads the
    missing ``size - side`` on *both* sides and reflect padding must be shorter than the side it
    mirrors, so padding works only for ``side > size / 2``: smaller images are upsampled.
    """
    short = min(img.shape[-2:])
    if short >= size or (reflect_pad and 2 * short > size):
        return img
    return v2.functional.resize(img, size, antialias=True)


class RandomZoomOut:
    """Random crop of side ``round(size * s)``, ``s`` uniform in ``[1, max_zoom_out]``, resized down to
    ``size`` (antialiased): each training crop sees the photo at a random coarser scale. Downscaled photos
    are sharper and hold more structure per crop, which a deblurring prior trained on few photos needs
    (the test photos come at other resolutions)."""

    def __init__(self, size: int, max_zoom_out: float):
        self.size, self.max_zoom_out = size, float(max_zoom_out)

    def __call__(self, img: Tensor) -> Tensor:
        s = 1.0 + (self.max_zoom_out - 1.0) * float(torch.rand(()))
        side = min(round(self.size * s), *img.shape[-2:])
        if side <= self.size:
            return img
        img = v2.RandomCrop(side)(img)
        return v2.functional.resize(img, [self.size, self.size], antialias=True)


def check_zoom_out(max_zoom_out: object) -> float:
    """``data.dataset.max_zoom_out``: a number >= 1 (1 = no zoom-out augmentation)."""
    if isinstance(max_zoom_out, bool) or not isinstance(max_zoom_out, (int, float)) or not max_zoom_out >= 1:
        raise DatasetError(f"data.dataset.max_zoom_out must be a number >= 1 (1: off), got {max_zoom_out!r}")
    return float(max_zoom_out)


# antialiased resizing rounds saturated pixels to 1 + 1.2e-7 (measured: a real MR slice at data.dataset.resize=128;
# a bicubic resize would also ring past 0 and 1 at edges): back into [0, 1], the range the datamodule checks and the
# metrics assume (data_range=1)
CLAMP_01 = functools.partial(torch.clamp, min=0.0, max=1.0)


def split_transform(split: str, image_size: int, resize: int | None = None,
                    max_zoom_out: float = 1.0, rot90: bool = False,
                    channel_shuffle: bool = False) -> Callable[[Tensor], Tensor]:
    """Every split: optional resize of the shorter side to ``resize`` (same scale in train and test).
    Train: optional random zoom-out (:class:`RandomZoomOut`), random crop (reflect-padded if the image
    is smaller, upsampled if under half the crop) + flips; with ``rot90`` also a random transpose (with the
    flips: all eight rotations and reflections of the square), with ``channel_shuffle`` a random order of the
    colour channels.
    Val/test: center crop (upsampled first if smaller): the same pixels every time."""
    ops: list = [v2.Resize(resize, antialias=True)] if resize else []
    if split == "train":
        if max_zoom_out > 1:
            ops.append(RandomZoomOut(image_size, max_zoom_out))
        ops += [functools.partial(ensure_min_size, size=image_size, reflect_pad=True),
                v2.RandomCrop(image_size, pad_if_needed=True, padding_mode="reflect"),
                v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
        if rot90:
            ops.append(v2.RandomApply([v2.Lambda(functools.partial(torch.transpose, dim0=-2, dim1=-1))]))
        if channel_shuffle:
            ops.append(v2.RandomChannelPermutation())
    else:
        ops += [functools.partial(ensure_min_size, size=image_size), v2.CenterCrop(image_size)]
    return v2.Compose(ops + [CLAMP_01])


def _few(items: list, n: int = 3) -> str:
    """The first ``n`` items, comma separated, with '...' if there are more."""
    return ", ".join(str(x) for x in items[:n]) + (", ..." if len(items) > n else "")


def _check_files(files: list[Path], channels: int, where: str) -> list[tuple[Path, int, int]]:
    """Decode every file; one DatasetError listing the unreadable ones. Returns (path, height, width)."""
    sizes, bad = [], []
    for p in files:
        try:
            img = load_image(p, channels)
        except DatasetError as e:
            bad.append(str(e))
            continue
        sizes.append((p, img.shape[-2], img.shape[-1]))
    if bad:
        raise DatasetError(f"{len(bad)} of {len(files)} images in {where} cannot be read: {'; '.join(bad[:3])}"
                           + ("; ..." if len(bad) > 3 else ""))
    return sizes


class ImageFolder(Dataset):
    """Every image file directly under ``<root>/<split>`` (any size, RGB or grayscale, 8 or 16 bit).

    ``resize`` (optional) scales the shorter side of every image, in every split, before cropping.
    Images still smaller than ``image_size`` are upsampled (val/test) or reflect-padded (train;
    upsampled when under half the crop, where reflect padding cannot reach): ``check()`` logs one
    warning saying how many.
    """

    def __init__(self, split: str, image_size: int, root: str | Path | None = None, channels: int = 3,
                 resize: int | None = None):
        if root is None:
            raise DatasetNotFoundError("data=folder needs data.root=<dir> with images in <dir>/train, <dir>/val, <dir>/test")
        self.image_size = check_int("data.image_size", image_size, 1)
        self.channels = check_channels(channels)
        self.resize = check_resize(resize, self.image_size)
        self.split, self.train = split, split == "train"
        self.dir = Path(root).expanduser() / split
        if not self.dir.is_dir():
            raise DatasetNotFoundError(
                f"image folder split {split!r} not found: expected a directory {self.dir} holding PNG/JPEG files "
                f"(layout <root>/train, <root>/val, <root>/test; set data.root=<root>)")
        entries = sorted(self.dir.iterdir())
        self.files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        others = [p.name for p in entries if p.is_file() and p not in self.files and not p.name.startswith(".")]
        if not self.files:
            subdirs = [p.name for p in entries if p.is_dir()]
            hint = f"; it has subfolders ({_few(subdirs)}): put the images directly in {self.dir}" if subdirs else ""
            hint += f"; files of other types are not read ({_few(others)})" if others else ""
            raise DatasetNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.dir}{hint}")
        if others:
            log.warning("%s: %d file(s) without an image suffix (%s) are not used: %s", self.dir, len(others),
                        ", ".join(sorted(IMAGE_SUFFIXES)), _few(others))
        self.transform = split_transform(split, self.image_size, self.resize)

    def check(self) -> None:
        """Open and fully decode every file (a truncated JPEG or a text file named .png fails with
        its path); log one warning if images are smaller than the crop."""
        sizes = _check_files(self.files, self.channels, str(self.dir))
        if self.resize:  # every shorter side becomes resize >= image_size
            return
        small = [(p, h, w) for p, h, w in sizes if min(h, w) < self.image_size]
        if not small:
            return
        names = _few([f"{p.name} ({w}x{h})" for p, h, w in small])
        if self.train:
            upsampled = sum(2 * min(h, w) <= self.image_size for _, h, w in small)
            log.warning("%d of %d training images in %s are smaller than data.image_size=%d (%s): reflect-padded, "
                        "%d of them upsampled (under half the crop)", len(small), len(sizes), self.dir,
                        self.image_size, names, upsampled)
        else:
            log.warning("%d of %d images in %s are smaller than data.image_size=%d (%s): upsampled before the "
                        "center crop", len(small), len(sizes), self.dir, self.image_size, names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        # load_image raises DatasetError naming the file, also for a file that breaks mid-training
        return self.transform(load_image(self.files[i], self.channels)).contiguous(), i


class CelebA(Dataset):
    """CelebA from its official layout, with the official split (Liu et al. [1] §5.1).

    ``<root>/celeba/img_align_celeba/*.jpg`` and ``<root>/celeba/list_eval_partition.txt``
    (lines ``<file> <0|1|2>`` for train/valid/test). Images are resized so the shorter side
    is ``resize`` (default image_size; at least image_size) and center-cropped to ``image_size``
    (128 in the paper); training adds flips. ``limit`` keeps the first n files of the split
    (Liu et al. [1] used 10k).

    Construction checks that every file the split lists exists (one directory listing, cheap for
    200k files). ``check()`` decodes only ``CHECK_DECODE`` files spread evenly over the split
    (first and last included), since decoding 200k JPEGs would take minutes; a file that is
    unreadable later raises DatasetError naming it when it is loaded.
    """

    SPLITS = {"train": 0, "val": 1, "test": 2}
    CHECK_DECODE = 64

    def __init__(self, split: str, image_size: int = 128, root: str | Path | None = None, channels: int = 3,
                 resize: int | None = None, limit: int | None = None):
        if split not in self.SPLITS:
            raise DatasetError(f"CelebA: split must be one of {list(self.SPLITS)}, got {split!r}")
        if root is None:
            raise DatasetNotFoundError("data=celeba needs data.root=<dir> where <dir>/celeba/img_align_celeba/*.jpg "
                                       "and <dir>/celeba/list_eval_partition.txt exist")
        self.image_size = check_int("data.image_size", image_size, 1)
        self.channels = check_channels(channels)
        resize = check_resize(resize, self.image_size)
        limit = check_int("data.dataset.limit", limit, 1, allow_none=True)
        base = Path(root).expanduser() / "celeba"
        self.img_dir, part = base / "img_align_celeba", base / "list_eval_partition.txt"
        if not self.img_dir.is_dir() or not part.is_file():
            raise DatasetNotFoundError(
                f"CelebA not found under {base}: expected {self.img_dir}/*.jpg and {part} "
                f"(the official layout; set data.root to the folder that contains 'celeba/')")
        names = self.read_partition(part)[self.SPLITS[split]]
        if not names:
            raise DatasetNotFoundError(f"CelebA split {split!r} is empty in {part}: no line ends in "
                                       f"{self.SPLITS[split]}; restore the official partition file")
        if limit is not None and limit > len(names):
            log.warning("data.dataset.limit=%d but the CelebA %s split has %d images: using all of them", limit,
                        split, len(names))
        names = names[:limit]
        present = set(os.listdir(self.img_dir))
        missing = [n for n in names if n not in present]
        if missing:
            raise DatasetNotFoundError(
                f"{len(missing)} of the {len(names)} {split} images listed in {part} are missing from {self.img_dir} "
                f"(first: {_few(missing)}); extract all of img_align_celeba.zip there")
        self.files = [self.img_dir / n for n in names]
        ops = [v2.Resize(resize or self.image_size, antialias=True), v2.CenterCrop(self.image_size), CLAMP_01]
        if split == "train":
            ops.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(ops)

    @staticmethod
    def read_partition(part: Path) -> dict[int, list[str]]:
        """``list_eval_partition.txt`` -> {0: train files, 1: val files, 2: test files}, in file order.

        Blank lines are skipped; any other line that is not ``<file> <0|1|2>`` raises DatasetError
        with the file and line number.
        """
        try:
            text = part.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read the CelebA partition file {part}: {e}") from e
        splits: dict[int, list[str]] = {0: [], 1: [], 2: []}
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DatasetError(f"{part}, line {lineno}: expected '<image file> <0|1|2>' (train/val/test), got "
                                   f"{line.strip()!r}; restore the official list_eval_partition.txt")
            splits[int(fields[1])].append(fields[0])
        return splits

    def check(self) -> None:
        """Decode up to ``CHECK_DECODE`` files spread over the split (existence of all was checked)."""
        n, k = len(self.files), min(len(self.files), self.CHECK_DECODE)
        picks = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
        _check_files([self.files[i] for i in picks], self.channels, str(self.img_dir))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.files[i], self.channels)).contiguous(), i
