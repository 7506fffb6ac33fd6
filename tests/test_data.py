"""Bad input fails early, names its cause and never passes silently (jfb_ip.data).

Every case writes its own tiny files and checks the loaded pixels against values computed here, or
the error type and the file / config key the message must name.
"""
from __future__ import annotations

import functools
import logging
import re
import shutil
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg, write_images
from jfb_ip.data import (NATURAL_SPLITS, CelebA, DatasetError, DatasetNotFoundError, ImageDataModule, ImageFolder,
                         NaturalImages)
from jfb_ip.data.images import ensure_min_size, load_image, split_transform

# ---------------------------------------------------------------------------------------------
# helpers


def folder_module(root: Path, image_size: int = 16, channels: int = 3, num_workers: int = 0) -> ImageDataModule:
    return ImageDataModule(functools.partial(ImageFolder), root=str(root), image_size=image_size, channels=channels,
                           num_workers=num_workers)


def gradient16(h: int = 12, w: int = 10) -> np.ndarray:
    """Known 16-bit values spanning the whole range, most of them above 255 (where 8-bit conversion clips)."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def center(img: torch.Tensor, size: int) -> torch.Tensor:
    """The center size x size crop, rounding the offsets as torchvision's CenterCrop does."""
    h, w = img.shape[-2:]
    top, left = round((h - size) / 2), round((w - size) / 2)
    return img[:, top: top + size, left: left + size]


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_celeba(root: Path, splits: list[int], n_files: int | None = None) -> tuple[Path, list[Path]]:
    """<root>/celeba/img_align_celeba/*.jpg (n_files of them) + a partition listing len(splits) files."""
    imgs = write_images(root / "celeba" / "img_align_celeba", len(splits) if n_files is None else n_files,
                        (20, 24), fmt="jpg")
    names = [f"img_{i:03d}.jpg" for i in range(len(splits))]
    part = root / "celeba" / "list_eval_partition.txt"
    part.write_text("".join(f"{n} {s}\n" for n, s in zip(names, splits)))
    return part, imgs


# ---------------------------------------------------------------------------------------------
# 1. high bit-depth images load scaled by their bit depth, not clipped to white


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_is_scaled_by_its_bit_depth(tmp_path, channels):
    arr = gradient16()
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode == "I;16"  # the case Pillow's convert("L") turns white
    x = load_image(path, channels)
    want = torch.from_numpy(arr / 65535.0).float()
    assert x.shape == (channels, 12, 10)
    for c in range(channels):
        torch.testing.assert_close(x[c], want, atol=1e-4, rtol=0)


def _big_endian_16(path: Path, arr: np.ndarray) -> None:
    Image.frombytes("I;16B", arr.shape[::-1], arr.astype(">u2").tobytes()).save(path)


def _pgm_16(path: Path, arr: np.ndarray) -> None:  # maxval 65535: Pillow opens it as mode "I"
    path.write_bytes(f"P5\n{arr.shape[1]} {arr.shape[0]}\n65535\n".encode() + arr.astype(">u2").tobytes())


@pytest.mark.parametrize("name,write,mode,white", [
    ("be16.tif", _big_endian_16, "I;16B", 65535.0),
    ("g16.pgm", _pgm_16, "I", 65535.0),
    ("g32.tif", lambda p, a: Image.fromarray(a.astype(np.int32) * 1000).save(p), "I", (2 ** 32 - 1) / 1000),
    ("float.tif", lambda p, a: Image.fromarray((a / 65535.0).astype(np.float32)).save(p), "F", 65535.0),
])
def test_other_high_bit_depth_modes(tmp_path, name, write, mode, white):
    arr = gradient16()
    write(tmp_path / name, arr)
    assert Image.open(tmp_path / name).mode == mode
    x = load_image(tmp_path / name, 1)
    torch.testing.assert_close(x[0], torch.from_numpy(arr / white).float(), atol=1e-4, rtol=0)


def test_float_image_outside_unit_range_names_the_file(tmp_path):
    Image.fromarray(np.full((4, 4), 200.0, np.float32)).save(tmp_path / "f255.tif")
    with pytest.raises(DatasetError, match=r"f255\.tif.*\[200, 200\].*outside \[0, 1\]"):
        load_image(tmp_path / "f255.tif", 3)


def test_16bit_folder_images_are_not_white(tmp_path):
    arr = gradient16(20, 20)
    for split in ("train", "val", "test"):
        (tmp_path / split).mkdir()
        Image.fromarray(arr).save(tmp_path / split / "a.png")
    dm = folder_module(tmp_path, image_size=20, channels=1)
    dm.validate("fit")
    x, _ = dm.split("test")[0]
    torch.testing.assert_close(x[0], torch.from_numpy(arr / 65535.0).float(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# 2. the error types


def test_error_types():
    assert issubclass(DatasetError, ValueError)
    assert issubclass(DatasetNotFoundError, DatasetError) and issubclass(DatasetNotFoundError, FileNotFoundError)
    for cls in (DatasetError, DatasetNotFoundError):  # what DataLoader workers do to re-raise: type(msg)
        e = cls("msg naming x.png")
        assert str(e) == "msg naming x.png"


def test_worker_errors_keep_their_type_and_name_the_file(tmp_path):
    """A file that breaks after validation, read by a DataLoader worker process."""
    for split in ("train", "val", "test"):
        write_images(tmp_path / split, 2, (20, 20), seed=len(split))
    dm = folder_module(tmp_path, num_workers=1)
    dm.validate("fit")
    (tmp_path / "test" / "img_001.png").write_text("not an image any more")
    with pytest.raises(DatasetError, match=r"test/img_001\.png"):
        for _ in dm.test_dataloader():
            pass


def test_a_file_deleted_mid_training_names_it(tmp_path):
    write_images(tmp_path / "train", 2, (20, 20))
    ds = ImageFolder("train", 16, root=tmp_path)
    (tmp_path / "train" / "img_000.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"train/img_000\.png does not exist"):
        ds[0]


# ---------------------------------------------------------------------------------------------
# 3. validate(): every split a stage needs, every file, before training


@pytest.fixture
def three_splits(tmp_path) -> Path:
    for split in ("train", "val", "test"):
        write_images(tmp_path / split, 2, (20, 18), seed=len(split))
    return tmp_path


def test_fit_validation_finds_a_missing_test_split(three_splits):
    shutil.rmtree(three_splits / "test")
    with pytest.raises(DatasetNotFoundError, match=r"split 'test' not found.*test"):
        folder_module(three_splits).validate("fit")


def test_test_validation_needs_only_the_test_split(three_splits):
    shutil.rmtree(three_splits / "train"), shutil.rmtree(three_splits / "val")
    folder_module(three_splits).validate("test")
    with pytest.raises(DatasetNotFoundError, match="split 'train' not found"):
        folder_module(three_splits).validate("fit")
    with pytest.raises(ValueError, match="stage must be one of"):
        folder_module(three_splits).validate("train")


@pytest.mark.parametrize("bad", ["truncated.jpg", "truncated.png", "text.png"])
def test_unreadable_files_fail_validation_with_their_path(three_splits, bad):
    val = three_splits / "val"
    if bad == "text.png":
        (val / bad).write_text("hello, not a PNG")
    else:
        a = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(val / bad)
        truncate(val / bad)
    dm = folder_module(three_splits)
    message = rf"1 of 3 images in .*val cannot be read: cannot read image .*{re.escape(bad)}"
    with pytest.raises(DatasetError, match=message):
        dm.validate("fit")


def test_validation_leaves_the_random_stream_alone(three_splits):
    state = torch.get_rng_state()
    folder_module(three_splits).validate("fit")
    assert torch.equal(torch.get_rng_state(), state)


def test_small_eval_images_are_upsampled_with_one_warning(tmp_path, caplog):
    write_images(tmp_path / "train", 1, (20, 20))
    write_images(tmp_path / "val", 1, (20, 20))
    write_images(tmp_path / "test", 3, (10, 12), seed=1)  # all three below the 16 crop
    dm = folder_module(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jfb_ip.data"):
        dm.validate("fit")
    small = [r.getMessage() for r in caplog.records if "smaller than data.image_size=16" in r.getMessage()]
    assert len(small) == 1 and small[0].startswith("3 of 3 images in") and "img_000.png (10x12)" in small[0]
    x, _ = dm.split("test")[0]
    assert x.shape == (3, 16, 16)


def test_small_training_images_are_reflect_padded_or_upsampled(tmp_path, caplog):
    """RandomCrop's reflect padding fails below half the crop: those images are upsampled instead."""
    write_images(tmp_path / "train", 1, (10, 12))  # 10 > 16 / 2: reflect padding works
    Image.fromarray(np.arange(35, dtype=np.uint8).reshape(5, 7)).save(tmp_path / "train" / "tiny.png")  # 5 <= 8
    ds = ImageFolder("train", 16, root=tmp_path, channels=1)
    with caplog.at_level(logging.WARNING, logger="jfb_ip.data"):
        ds.check()
    assert any("2 of 2 training images" in r.getMessage() and "1 of them upsampled" in r.getMessage()
               for r in caplog.records)
    padded_src = load_image(ds.files[0], 1)
    for _ in range(5):
        padded, tiny = ds[0][0], ds[1][0]
        assert padded.shape == tiny.shape == (1, 16, 16)
        # reflect padding only copies pixels: every output value is an input value
        assert torch.isin(padded, padded_src).all()
    assert not torch.isin(tiny, load_image(ds.files[1], 1)).all()  # upsampling interpolates new values


def test_ensure_min_size_threshold():
    x = torch.rand(1, 9, 30)
    assert ensure_min_size(x, 16, reflect_pad=True) is x  # 2 * 9 > 16: left to the reflect padding
    assert ensure_min_size(x, 16).shape == (1, 16, 53)  # center crops need the full size
    assert ensure_min_size(torch.rand(1, 8, 30), 16, reflect_pad=True).shape == (1, 16, 60)
    for side in (5, 8, 9, 15):  # the whole train transform works for every side below the crop
        assert split_transform("train", 16)(torch.rand(3, side, side + 3)).shape == (3, 16, 16)


def test_files_in_subfolders_are_named(tmp_path):
    write_images(tmp_path / "train" / "cats", 1)
    (tmp_path / "train" / "notes.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError, match=r"no images .*subfolders \(cats\).*other types.*notes\.txt"):
        ImageFolder("train", 16, root=tmp_path)


def test_custom_dataset_yielding_the_wrong_shape_fails_validation():
    class Wrong(torch.utils.data.Dataset):
        def __init__(self, split, image_size, channels):
            self.size = image_size + 1

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.zeros(3, self.size, self.size), i

    with pytest.raises(DatasetError, match=r"train split yields \(3, 17, 17\).*\(3, 16, 16\)"):
        ImageDataModule(Wrong, image_size=16).validate("fit")


# ---------------------------------------------------------------------------------------------
# 4. CelebA partition file


def test_celeba_reports_every_missing_file(tmp_path):
    part, imgs = make_celeba(tmp_path, [0, 0, 0, 0, 0, 1, 2], n_files=7)
    imgs[3].unlink(), imgs[4].unlink()  # beyond the first 3, so a check of only those would miss them
    with pytest.raises(DatasetNotFoundError, match=r"2 of the 5 train images .* missing .*img_003\.jpg, img_004\.jpg"):
        CelebA("train", 16, root=tmp_path)
    assert len(CelebA("val", 16, root=tmp_path)) == 1  # the other splits are complete


@pytest.mark.parametrize("line", ["img_002.jpg x", "img_002.jpg", "img_002.jpg 3", "img_002.jpg 0 extra"])
def test_celeba_malformed_partition_line_names_file_and_line(tmp_path, line):
    part, _ = make_celeba(tmp_path, [0, 1, 2])
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:2] + ["", line]) + "\n")  # blank line 3 is fine; line 4 is not
    with pytest.raises(DatasetError, match=rf"list_eval_partition\.txt, line 4: .*{re.escape(repr(line))}"):
        CelebA("test", 16, root=tmp_path)


def test_celeba_check_decodes_a_sample_including_the_last_file(tmp_path, monkeypatch):
    part, imgs = make_celeba(tmp_path, [0] * 9)
    truncate(imgs[-1])
    monkeypatch.setattr(CelebA, "CHECK_DECODE", 3)  # files 0, 4, 8
    ds = CelebA("train", 16, root=tmp_path)
    with pytest.raises(DatasetError, match=r"1 of 3 images .*img_008\.jpg"):
        ds.check()


def test_celeba_limit_and_resize(tmp_path):
    make_celeba(tmp_path, [0, 0, 0, 1, 2])
    assert [p.name for p in CelebA("train", 16, root=tmp_path, limit=2).files] == ["img_000.jpg", "img_001.jpg"]
    for bad, key in [({"limit": 0}, "data.dataset.limit=0"), ({"limit": -1}, "data.dataset.limit=-1"),
                     ({"resize": 8}, "data.dataset.resize=8 is smaller than data.image_size=16"),
                     ({"resize": 0}, "data.dataset.resize=0")]:
        with pytest.raises(DatasetError, match=re.escape(key)):
            CelebA("train", 16, root=tmp_path, **bad)


# ---------------------------------------------------------------------------------------------
# 5. config values


@pytest.mark.parametrize("key,value", [("channels", 2), ("channels", True), ("batch_size", 0), ("eval_batch_size", 0),
                                       ("image_size", 0), ("num_workers", -1), ("image_size", 16.5)])
def test_bad_data_values_name_their_key(key, value):
    with pytest.raises(DatasetError, match=rf"data\.{key}={re.escape(repr(value))} is invalid"):
        ImageDataModule(functools.partial(NaturalImages), **{key: value})


def test_natural_refuses_a_root_and_points_to_the_folder_dataset(tmp_path):
    cfg = compose_cfg("train", [f"data.root={tmp_path}"], tmp_path)
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(cfg.data)
    cause = info.value
    while cause.__cause__ is not None:  # Hydra wraps errors raised while instantiating
        cause = cause.__cause__
    assert isinstance(cause, DatasetError)
    assert "data.root=" in str(cause) and "data=folder data.root=<dir>" in str(cause)


@pytest.mark.parametrize("kw,key", [({"train_samples": 0}, "data.dataset.train_samples=0"),
                                    ({"eval_crops": 0}, "data.dataset.eval_crops=0"),
                                    ({"eval_crops": -3}, "data.dataset.eval_crops=-3")])
def test_natural_counts_must_be_positive(kw, key):
    with pytest.raises(DatasetError, match=re.escape(key)):
        NaturalImages("val", 16, **kw)


def test_natural_gives_exactly_eval_crops_or_fails():
    # chelsea is 451x300: 3 x 2 non-overlapping 128x128 tiles
    assert len(NaturalImages("val", 128, eval_crops=6)) == 6
    with pytest.raises(DatasetError, match=r"eval_crops=7 .*only 6 non-overlapping 128x128 crops \(chelsea\.png: 6\)"):
        NaturalImages("val", 128, eval_crops=7)
    ds = NaturalImages("test", 100, eval_crops=11)  # odd, over two photos (astronaut 25 tiles, coffee 24)
    crops = [ds[i][0] for i in range(len(ds))]
    assert len(crops) == 11 and all(c.shape == (3, 100, 100) for c in crops)
    assert len({c.sum().item() for c in crops}) == 11  # all different pixels
    assert NATURAL_SPLITS["test"] == ["astronaut.png", "coffee.png"]


def test_folder_resize_is_applied_and_checked(three_splits):
    ds = ImageFolder("val", 8, root=three_splits, resize=12)
    src = load_image(ds.files[0], 3)  # 20 wide, 18 high -> 13x12, center 8x8
    want = center(torch.nn.functional.interpolate(src[None], size=(12, 13), mode="bilinear", antialias=True,
                                                     align_corners=False)[0], 8)
    torch.testing.assert_close(ds[0][0], want, atol=2e-3, rtol=0)
    with pytest.raises(DatasetError, match=r"data\.dataset\.resize=4 is smaller than data\.image_size=8"):
        ImageFolder("val", 8, root=three_splits, resize=4)


def test_zoom_out_crops_see_the_photo_at_coarser_scales():
    # a horizontal ramp of slope 1/W: a crop zoomed out by s has slope s/W, measured independently
    from jfb_ip.data.images import RandomZoomOut
    W = 256
    ramp = torch.linspace(0, 1, W).expand(1, W, W).clone()
    torch.manual_seed(0)
    slopes = []
    for _ in range(40):
        crop = RandomZoomOut(32, 3.0)(ramp)
        assert crop.shape == (1, 32, 32)
        slopes.append(float((crop[0, 16, 24] - crop[0, 16, 8]) / 16) * (W - 1))
    assert 0.98 < min(slopes) and max(slopes) < 3.02
    assert max(slopes) - min(slopes) > 1.0  # the scale really varies
    assert float((RandomZoomOut(32, 1.0)(ramp[..., :32, :32]) - ramp[..., :32, :32]).abs().max()) == 0


@pytest.mark.parametrize("bad", [0.5, "abc", True])
def test_zoom_out_is_checked(bad):
    with pytest.raises(DatasetError, match="max_zoom_out"):
        NaturalImages("train", 32, 3, 4, max_zoom_out=bad)


def test_resized_images_stay_in_the_unit_range():
    """Antialiased resizing of saturated pixels rounds to 1 + 1.2e-7 (found on a real MR slice with
    data.dataset.resize=128, which the datamodule's range check then refused): every split's transform clamps."""
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(1, 60, 97, generator=g) > 0.3).float() for _ in range(10)]
    assert max(float(v2.Resize(26, antialias=True)(x).max()) for x in images) > 1.0  # the case exists
    for split in ("train", "test"):
        for x in images:
            y = split_transform(split, 16, resize=26)(x)
            assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    rots = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return rots + [r.flip(-1) for r in rots]


@pytest.mark.parametrize("rot90,expected", [(False, 4), (True, 8)])
def test_rot90_adds_the_transposed_half_of_the_square_symmetries(rot90, expected):
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8) / 192  # no two symmetries coincide
    group = _dihedral(x)
    transform = split_transform("train", 8, rot90=rot90)
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        y = transform(x)
        hits = [k for k, g in enumerate(group) if torch.equal(y, g)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == expected


def test_channel_shuffle_reorders_colour_channels_only():
    import itertools

    x = torch.stack([torch.full((8, 8), v) for v in (0.1, 0.5, 0.9)])
    perms = list(itertools.permutations(range(3)))
    transform = split_transform("train", 8, channel_shuffle=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(100):
        y = transform(x)
        seen.add(next(p for p in perms if torch.equal(y, x[list(p)])))
    assert len(seen) == 6
    assert all(torch.equal(split_transform("train", 8)(x)[:, 0, 0], x[:, 0, 0]) for _ in range(20))


@pytest.mark.parametrize("key", ["rot90", "channel_shuffle"])
def test_augmentation_switches_must_be_booleans(key):
    with pytest.raises(DatasetError, match=key):
        NaturalImages("train", 32, 3, 4, **{key: "yes"})


# ---- DICOM slices --------------------------------------------------------------------------------------------------
def write_dicom(path, pixels, slope=1.0, intercept=0.0, frames=1):
    """A minimal CT DICOM file of int16 pixels (rows x columns, or frames x rows x columns) with a rescale."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CT"
    arr = np.asarray(pixels, dtype=np.int16)
    ds.Rows, ds.Columns = arr.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_slice_is_rescaled_then_scaled_by_its_own_range(tmp_path):
    raw = np.random.default_rng(0).integers(-200, 1800, size=(9, 11))
    write_dicom(tmp_path / "a.dcm", raw, slope=2.0, intercept=-1024.0)
    hu = raw * 2.0 - 1024.0  # the rescale DICOM defines, then min -> 0, max -> 1
    want = (hu - hu.min()) / (hu.max() - hu.min())
    got = load_image(tmp_path / "a.dcm", channels=1)
    assert got.shape == (1, 9, 11) and np.allclose(got[0].numpy(), want, atol=1e-6)
    assert torch.equal(load_image(tmp_path / "a.dcm", channels=3), got.expand(3, -1, -1))


def test_bad_dicom_files_name_the_file_and_the_fix(tmp_path):
    write_dicom(tmp_path / "frames.dcm", np.arange(2 * 4 * 5).reshape(2, 4, 5), frames=2)
    write_dicom(tmp_path / "flat.dcm", np.full((4, 5), 7))
    (tmp_path / "text.dcm").write_text("not a DICOM file")
    for name, message in (("frames.dcm", "one grayscale slice is expected"), ("flat.dcm", "the slice is constant"),
                          ("text.dcm", "cannot read DICOM slice")):
        with pytest.raises(DatasetError, match=message) as e:
            load_image(tmp_path / name, channels=1)
        assert name in str(e.value)


def test_a_folder_of_dicom_slices_is_an_image_folder(tmp_path):
    test = tmp_path / "test"
    test.mkdir()
    for i in range(3):
        write_dicom(test / f"slice{i}.dcm", np.random.default_rng(i).integers(0, 4000, size=(20, 24)))
    ds = ImageFolder("test", image_size=16, root=tmp_path, channels=1)
    ds.check()
    assert len(ds) == 3 and all(ds[i][0].shape == (1, 16, 16) for i in range(3))


def test_real_slices_from_the_installed_package(tmp_path):
    """python -m jfb_ip.data.real_slices: pydicom's four real slices, in the data=folder layout, all readable."""
    from jfb_ip.data.real_slices import main

    written = main([str(tmp_path)])
    shapes = {p.name: tuple(load_image(p, 1).shape[-2:]) for files in written.values() for p in files}
    assert shapes == {"MR_small.dcm": (64, 64), "examples_overlay.dcm": (300, 484), "CT_small.dcm": (128, 128),
                      "J2K_pixelrep_mismatch.dcm": (512, 512)}
    for modality in ("mr", "ct"):
        assert len(ImageFolder("test", image_size=64, root=tmp_path / modality, channels=1, resize=64)) == 2


def test_other_faces_are_framed_like_celeba(tmp_path):
    """python -m jfb_ip.data.other_faces: two installed portraits, each at CelebA's aligned size with its face found
    again (a fresh detection on the written image) where CelebA's faces are, readable by data=folder."""
    from jfb_ip.data.other_faces import CELEBA_FACE_CENTER, CELEBA_FACE_WIDTH, detect_face, main

    written = main([str(tmp_path)])
    assert sorted(p.name for p in written) == ["astronaut.png", "grace_hopper.png"]
    for path in written:
        image = (load_image(path, 3).permute(1, 2, 0) * 255).round().byte().numpy()
        assert image.shape == (218, 178, 3)
        row, col, width = detect_face(image)
        # grace_hopper's ideal crop reaches above the photo: shifted by 6 CelebA pixels; the cascade's boxes come in
        # scale steps of 1.2, so a fresh detection moves by a few pixels more
        assert abs(row - CELEBA_FACE_CENTER[0]) <= 12 and abs(col - CELEBA_FACE_CENTER[1]) <= 5
        assert abs(width / CELEBA_FACE_WIDTH - 1) <= 0.15
    assert len(ImageFolder("test", image_size=64, root=tmp_path, resize=64)) == 2
