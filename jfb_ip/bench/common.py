"""Helpers shared by the benchmarks."""
from __future__ import annotations

from pathlib import Path

import json

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from .. import config_dir
from ..lit.checks import instantiate_group

# the config groups a ReconstructionModule and its data need (the trainer's keys need a running Hydra app)
MODULE_GROUPS = ("method", "task", "module", "data")


def compose_train(overrides: list[str]) -> DictConfig:
    """``train.py``'s config with ``overrides``, composed from the package's configs outside a Hydra app."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


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
