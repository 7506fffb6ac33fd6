"""Real CT and MR slices from an installed package, as an image folder to evaluate on.

    python -m jfb_ip.data.real_slices <dir>

pydicom's wheel (a dependency) ships DICOM test files, among them four real grayscale slices: two MR (a 64 x 64
slice and a 300 x 484 abdomen) and two CT (a 128 x 128 thorax slice at the spine and a 512 x 512 head). This copies
them into ``<dir>/mr/test/`` and ``<dir>/ct/test/``, the layout of ``data=folder``, so that a model trained on the
embedded phantoms is measured on anatomy it never saw:

    python evaluate.py ckpt_path=<task=mri4x run>/checkpoints/last.ckpt data=folder data.root=<dir>/mr \\
        data.channels=1 data.image_size=64 data.dataset.resize=64
    python evaluate.py ckpt_path=<task=ct run>/checkpoints/last.ckpt data=folder data.root=<dir>/ct \\
        data.channels=1 data.image_size=128 data.dataset.resize=128

The files are copied, not converted: ``data=folder`` reads DICOM itself (``jfb_ip.data.images.load_dicom``: the
slice's own range mapped to [0, 1]).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# modality folder -> pydicom test files that hold one real grayscale slice each
SLICES = {"mr": ("MR_small.dcm", "examples_overlay.dcm"), "ct": ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm")}


def write_real_slices(root: str | Path) -> dict[str, list[Path]]:
    """Copy the slices into ``<root>/<modality>/test/``; returns the written files per modality."""
    from pydicom.data import get_testdata_file

    out: dict[str, list[Path]] = {}
    for modality, names in SLICES.items():
        folder = Path(root).expanduser() / modality / "test"
        folder.mkdir(parents=True, exist_ok=True)
        out[modality] = []
        for name in names:
            src = get_testdata_file(name, download=False)
            if src is None:
                raise FileNotFoundError(f"pydicom's test file {name} is not installed; reinstall pydicom "
                                        f"(pip install -e .)")
            out[modality].append(Path(shutil.copyfile(src, folder / name)))
    return out


def main(argv: list[str] | None = None) -> dict[str, list[Path]]:
    p = argparse.ArgumentParser(prog="python -m jfb_ip.data.real_slices", description=__doc__.split("\n")[0])
    p.add_argument("root", help="the folder to write <root>/mr/test and <root>/ct/test into")
    written = write_real_slices(p.parse_args(argv).root)
    for modality, files in written.items():
        print(f"{modality}: {len(files)} slices in {files[0].parent}")
    return written


if __name__ == "__main__":
    main()
