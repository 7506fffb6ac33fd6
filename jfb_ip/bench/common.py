"""Helpers shared by the benchmarks."""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from datetime import datetime
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from .. import config_dir
from ..lit.checks import instantiate_group

# the config groups a ReconstructionModule and its data need (the trainer's keys need a running Hydra app)
MODULE_GROUPS = ("method", "task", "module", "data")


def compose_train(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """``train.py``'s config with ``overrides``, composed from the package's configs outside a Hydra app (with
    ``return_hydra_config``, its ``hydra`` node too: ``cfg.hydra.runtime.choices`` names each group's option)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


def module_groups(cfg: DictConfig) -> DictConfig:
    """The groups of :data:`MODULE_GROUPS`, resolved (``data.seed=${seed}`` and the like point outside them)."""
    return OmegaConf.create({k: OmegaConf.to_container(cfg[k], resolve=True) for k in MODULE_GROUPS})


def seeded_split_batch(data_cfg, module, split: str, n: int | None = None):
    """The first ``n`` images (all: None) of the ``val`` or ``test`` split and the seeded measurements the module
    makes of them in that split: exactly what ``train.py`` validates or tests on."""
    dm = instantiate_group(OmegaConf.create({"data": data_cfg}), "data")
    dm.setup("fit" if split == "val" else "test")
    ds = (dm.val_dataloader() if split == "val" else dm.test_dataloader()).dataset
    n = len(ds) if n is None else min(n, len(ds))
    x = torch.stack([ds[i][0] for i in range(n)])
    return x, module.seeded_measurement(x, torch.arange(n), split)


class SavedBytes:
    """Bytes of the distinct storages saved for backward inside the context, those in ``exclude``
    (addresses counted elsewhere) left out; storages stay referenced until exit, so an address is
    never reused and deduplication by address is exact. Deterministic, unlike a process's RSS."""

    def __init__(self, exclude=()):
        self.exclude = set(exclude)

    def __enter__(self):
        self.seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude:
            self.seen.setdefault(s.data_ptr(), s)
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self.nbytes = sum(s.nbytes() for s in self.seen.values())
        self.seen = {}


def pyplot(path):
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot skipped ({path}): matplotlib not installed")
        return None
    return plt


def save_figure(fig, path) -> None:
    """tight layout, write the PNG (creating its folder), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(payload: dict, json_path, png_path, plot) -> None:
    """Write the payload as JSON and ``plot(payload, png_path)``, where paths are given."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(payload, indent=1))
        print(f"wrote {json_path}")
    if png_path and plot(payload, png_path):
        print(f"wrote {png_path}")


def finish_rows(rows: list[dict], table, json_path) -> list[dict]:
    """Print ``table(rows)`` (a bench's whole table) and write the rows to ``json_path`` where given."""
    print("\n" + table(rows))
    if json_path:
        write_outputs({"rows": rows}, json_path, None, None)
    return rows


# argparse types: a bad value ends in argparse's usage line and one "argument --x: ..." line (exit status 2), before
# any work, instead of a traceback minutes later

def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


def float_at_least(low: float):
    """An argparse type: a finite number >= ``low``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value < math.inf:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low:g}, got {text!r}")
        return value
    return parse


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:<index>``, ``mps``)."""
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda, cuda:<index> or mps")
    if d.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (use cpu)")
        if d.index is not None and d.index >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    return text


def _creatable_dir(path: Path, what: str) -> None:
    """Raise unless the directory ``path`` exists or can be created, and a file can be written in it (probed with a
    temporary file in its nearest existing ancestor: permission bits say nothing for root or under /proc)."""
    anchor = path.absolute()
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {what}: {anchor} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=anchor):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {what}: no file can be created in {anchor} ({e.strerror})") from None


def output_file(text: str) -> str:
    """An argparse type: a file path this process can write (its folders are created later); '' (skip) passes."""
    if text == "":
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if path.exists():
        try:
            open(path, "ab").close()  # append mode: the file is left as it is
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot write {text} ({e.strerror})") from None
    else:
        _creatable_dir(path.parent, text)
    return text


def output_dir(text: str) -> Path:
    """An argparse type: a directory this process can create or write in."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    _creatable_dir(path, text)
    return path


def existing_file(text: str) -> str:
    """An argparse type: a file that exists (a checkpoint to read)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file" if path.is_dir() else f"{text} does not exist")
    return text


def fresh_run_dir(parent: Path) -> Path:
    """A new ``<parent>/runs/<timestamp>`` directory, as ``train.py`` names its runs (conf/hydra/default.yaml): every
    bench run starts in an empty one, so a checkpoint left by a failed run is never resumed or refused."""
    path = parent / "runs" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    path.mkdir(parents=True)
    return path
