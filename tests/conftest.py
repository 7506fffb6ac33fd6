"""Shared fixtures: composing the Hydra configs exactly as train.py/evaluate.py do."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

torch.set_num_threads(2)


def compose_cfg(config_name: str, overrides: list[str], out_dir: Path):
    """Compose like ``@hydra.main`` and register the Hydra config so ${hydra:...} resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# The smallest real run: 2 steps on 16x16 crops with a 3-layer net and few solver iterations.
TINY_ANY_DATA = ["debug=smoke", "logger=none", "data.image_size=16", "data.batch_size=4", "data.eval_batch_size=4",
                 "method.net.depth=3", "method.net.width=8", "solver.max_iter=5", "task.kernel_size=5"]
TINY = TINY_ANY_DATA + ["data.dataset.train_samples=8", "data.dataset.eval_crops=4"]


def picks_phantoms(task: str) -> bool:
    """Whether the task config selects data=phantoms itself (the grayscale CT/MRI tasks)."""
    return "data@_global_.data: phantoms" in (Path(CONF) / "task" / f"{task}.yaml").read_text()


def for_task(overrides: list[str], task: str) -> list[str]:
    """``overrides`` (TINY, ...) fitted to ``task=<task>``: the blur key only for the deblur tasks,
    the natural-image keys swapped for the phantom ones where the task picks data=phantoms."""
    out = [o for o in overrides if not o.startswith("task.")]
    if task.startswith("deblur"):
        out += [o for o in overrides if o.startswith("task.")]
    if task == "multitask":  # SR factors 1..4: the image side must be a multiple of 12, and hold the 15-tap blur
        out = [o for o in out if not o.startswith("data.image_size")] + ["data.image_size=24"]
    if picks_phantoms(task):
        out = [o for o in out if not o.startswith("data.dataset.")]
        if any(o.startswith("data.dataset.") for o in overrides):
            out += ["data.dataset.train_samples=8", "data.dataset.eval_samples=4"]
    return out


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def write_images(folder: Path, n: int, size=(40, 30), mode="RGB", fmt="png", seed=0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        c = 3 if mode == "RGB" else 1
        arr = (torch.rand(size[1], size[0], c, generator=g) * 255).to(torch.uint8).squeeze(-1).numpy()
        p = folder / f"img_{i:03d}.{fmt}"
        Image.fromarray(arr, mode=None).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """<root>/{train,val,test} with RGB PNGs, grayscale PNGs and JPEGs of odd sizes."""
    root = tmp_path / "images"
    write_images(root / "train", 3, (41, 37))
    write_images(root / "train", 2, (20, 25), mode="L", fmt="jpg", seed=1)
    write_images(root / "val", 2, (33, 35), seed=2)
    write_images(root / "test", 3, (50, 19), mode="L", seed=3)
    return root


@pytest.fixture
def fake_celeba(tmp_path) -> Path:
    """<root>/celeba/img_align_celeba/*.jpg + list_eval_partition.txt (official layout)."""
    root = tmp_path / "celeba_root"
    imgs = write_images(root / "celeba" / "img_align_celeba", 6, (178, 218), fmt="jpg")
    lines = [f"{p.name} {s}" for p, s in zip(imgs, [0, 0, 0, 1, 2, 2])]
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def run_train(args: list[str], tmp: Path, timeout: int = 600):
    """``python train.py <args>`` in a subprocess on one thread, wandb's caches kept under ``tmp``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_CACHE_DIR": str(tmp / "wandb_cache"),
           "WANDB_DATA_DIR": str(tmp / "wandb_data"), "WANDB_CONFIG_DIR": str(tmp / "wandb_config")}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """One real multirun shared by tests/test_wandb.py and tests/test_report.py: backward=jfb,implicit x seed=0,1
    (4 jobs of 2 training steps on 16x16 crops), logged to offline wandb with tags=[sweep_test]. Returns the sweep dir."""
    tmp = tmp_path_factory.mktemp("tiny_sweep")
    sweep = tmp / "sweep"
    r = run_train(["-m", "backward=jfb,implicit", "seed=0,1", "tags=[sweep_test]", "logger=wandb",
                   *[o for o in TINY if not o.startswith("logger=")], f"hydra.sweep.dir={sweep}"], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep


@pytest.fixture(scope="session")
def denoiser_ckpt(tmp_path_factory) -> Path:
    """A 3-channel denoiser checkpoint (:func:`write_denoiser_ckpt`) for method=pnp_admm."""
    return write_denoiser_ckpt(tmp_path_factory.mktemp("denoiser") / "last.ckpt")


def write_denoiser_ckpt(path: Path, channels: int = 3) -> Path:
    """A checkpoint in the layout train.py writes for method=denoiser (run config + ``method.net.*`` weights) with a
    tiny randomly initialised NoiseConditionedUNet: a prior method=pnp_admm loads (method.denoiser.path=<it>)."""
    from jfb_ip.nets import NoiseConditionedUNet

    torch.manual_seed(0)
    net_cfg = {"_target_": "jfb_ip.nets.NoiseConditionedUNet", "channels": channels, "features": [8, 16], "blocks": 1,
               "bias": False, "residual": True}
    net = NoiseConditionedUNet(**{k: v for k, v in net_cfg.items() if k != "_target_"})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"method.net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"run_config": {"method": {"_target_": "jfb_ip.methods.Denoiser", "net": net_cfg}}}},
               path)
    return path


@pytest.fixture(autouse=True)
def _restore_rank_zero(monkeypatch):
    """A Trainer built inside simulated SLURM/torchrun variables sets the process-wide rank_zero_only.rank to
    the simulated rank; without restoring it, every later test in the session would log and write nothing."""
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero
    from lightning_utilities.core import rank_zero as utils_rank_zero

    for m in (rank_zero, fabric_rank_zero, utils_rank_zero):
        monkeypatch.setattr(m.rank_zero_only, "rank", getattr(m.rank_zero_only, "rank", 0))
