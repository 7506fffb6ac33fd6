"""Faces from elsewhere, framed like CelebA's aligned faces, as an image folder to evaluate on.

    python -m jfb_ip.data.other_faces <dir>

Two portrait photos ship with installed packages: scikit-image's ``astronaut`` (Eileen Collins) and matplotlib's
``grace_hopper``. Neither is a CelebA image. This finds each face with scikit-image's LBP frontal-face cascade, crops
the photo so that the face box lands where the same detector puts it on CelebA's aligned faces, resizes the crop to
CelebA's 178 x 218, and writes ``<dir>/test/<name>.png``, the layout of ``data=folder``. A model trained on CelebA
(``experiment=celeba_cpu``) is then measured on faces it never saw, at the scale it was trained at:

    python evaluate.py ckpt_path=<celeba run>/checkpoints/last.ckpt data=folder data.root=<dir> \\
        data.image_size=64 data.dataset.resize=64 tv_weight=5.62e-4

(``tv_weight``: TV's weight chosen on CelebA's validation faces, ``conf/tv_weights/deblur_celeba.yaml``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# CelebA's aligned image and where the LBP cascade finds the face in it: the median box over the 45 of the first 60
# aligned faces of img_align_celeba/ with exactly one detection (spread 2.3 px in the centre, 7 px in the width)
CELEBA_SIZE = (218, 178)          # rows, columns
CELEBA_FACE_CENTER = (124.0, 89.5)
CELEBA_FACE_WIDTH = 104.0


def portraits() -> dict[str, np.ndarray]:
    """The installed portrait photos, ``name -> (H, W, 3) uint8``."""
    import matplotlib
    import skimage.data
    import skimage.io

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not hopper.is_file():
        raise FileNotFoundError(f"matplotlib's sample photo {hopper} is missing; reinstall matplotlib "
                                f"(pip install -e .)")
    return {"astronaut": skimage.data.astronaut()[..., :3], "grace_hopper": skimage.io.imread(hopper)[..., :3]}


def detect_face(image: np.ndarray) -> tuple[float, float, float]:
    """The largest frontal face in ``image`` (a portrait's subject) as (centre row, centre column, box width) in
    pixels."""
    import skimage.data
    from skimage.feature import Cascade

    detector = Cascade(skimage.data.lbp_frontal_face_cascade_filename())
    side = min(image.shape[:2])
    found = detector.detect_multi_scale(img=image, scale_factor=1.2, step_ratio=1, min_size=(side // 8, side // 8),
                                        max_size=(side, side))
    if not found:
        raise ValueError(f"detect_face: no face found in the {image.shape[0]}x{image.shape[1]} image")
    box = max(found, key=lambda b: b["width"])
    return box["r"] + box["height"] / 2, box["c"] + box["width"] / 2, float(box["width"])


def celeba_framed(image: np.ndarray) -> np.ndarray:
    """``image`` cropped and resized to CelebA's aligned size with its face where CelebA's are (the crop is shifted
    inside the photo where the ideal one would reach past an edge)."""
    from skimage.transform import resize

    row, col, width = detect_face(image)
    scale = CELEBA_FACE_WIDTH / width  # CelebA pixels per photo pixel
    h, w = round(CELEBA_SIZE[0] / scale), round(CELEBA_SIZE[1] / scale)
    if h > image.shape[0] or w > image.shape[1]:
        raise ValueError(f"celeba_framed: the face is too large for a CelebA framing inside the "
                         f"{image.shape[0]}x{image.shape[1]} photo")
    top = min(max(round(row - CELEBA_FACE_CENTER[0] / scale), 0), image.shape[0] - h)
    left = min(max(round(col - CELEBA_FACE_CENTER[1] / scale), 0), image.shape[1] - w)
    crop = image[top:top + h, left:left + w]
    return (resize(crop, CELEBA_SIZE, anti_aliasing=True) * 255).round().astype(np.uint8)


def write_other_faces(root: str | Path) -> list[Path]:
    """Write every portrait, CelebA-framed, into ``<root>/test/``; returns the files."""
    import skimage.io

    folder = Path(root).expanduser() / "test"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in portraits().items():
        path = folder / f"{name}.png"
        skimage.io.imsave(path, celeba_framed(image), check_contrast=False)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m jfb_ip.data.other_faces", description=__doc__.split("\n")[0])
    p.add_argument("root", help="the folder to write <root>/test into")
    written = write_other_faces(p.parse_args(argv).root)
    print(f"{len(written)} faces in {written[0].parent}")
    return written


if __name__ == "__main__":
    main()
