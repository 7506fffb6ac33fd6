"""Every option of every config group composes, instantiates and (for the run groups) trains."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import CONF, TINY, TINY_ANY_DATA, compose_cfg
from jfb_ip.lit.run import train

GROUPS = sorted(p.name for p in Path(CONF).iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


def test_every_group_has_options():
    assert {"method", "task", "backward", "data", "trainer", "logger", "callbacks", "experiment",
            "hparams_search", "launcher", "debug", "paths", "hydra"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", [(g, o) for g in ("method", "task", "backward", "trainer", "logger",
                                                             "callbacks", "data") for o in options(g)])
def test_option_instantiates(group, option, tmp_path, image_folder, fake_celeba):
    extra = {"folder": [f"data.root={image_folder}"], "celeba": [f"data.root={fake_celeba}"]}.get(option, [])
    base = TINY_ANY_DATA if group == "data" else TINY
    if group == "method":  # the tiny net/solver keys belong to DE-GRAD; each method has its own
        base = [o for o in base if not o.startswith("method.")]
    cfg = compose_cfg("train", base + [f"{group}={option}"] + (extra if group == "data" else []), tmp_path)
    node = cfg[group]
    if (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():
        pytest.skip("trainer=gpu composes; instantiating it needs a GPU")
    if group in ("logger", "callbacks"):
        objs = [hydra.utils.instantiate(c) for c in node.values()] if node else []
        assert all(o is not None for o in objs)
    elif group == "backward":
        assert "mode" in node
    elif group == "data":
        dm = hydra.utils.instantiate(node)
        dm.setup("fit"), dm.setup("test")
        x, idx = next(iter(dm.train_dataloader()))
        assert x.shape[1:] == (3, 16, 16) and x.dtype.is_floating_point
    else:
        assert hydra.utils.instantiate(node, _convert_="all") is not None


@pytest.mark.parametrize("option", options("experiment"))
def test_experiments_compose(option, tmp_path):
    cfg = compose_cfg("train", [f"experiment={option}"], tmp_path)
    assert cfg.method._target_


@pytest.mark.parametrize("group", ["hparams_search", "launcher", "debug"])
def test_other_groups_compose(group, tmp_path):
    for option in options(group):
        compose_cfg("train", [f"{group}={option}"], tmp_path)


def test_unknown_keys_fail(tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["method.not_a_key=1"], tmp_path)
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["task=not_a_task"], tmp_path)


@pytest.mark.parametrize("combo", [["method=degrad", "task=deblur"], ["method=degrad", "task=deblur_5x5"],
                                   ["debug=fast_dev_run"]])
def test_train_runs(combo, tmp_path):
    cfg = compose_cfg("train", TINY + combo, tmp_path)
    out = train(cfg)
    assert {"measurement", "wiener", "model"} <= set(out["test"])
    if "debug=fast_dev_run" not in combo:
        assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        assert metrics["test"]["model"]["psnr"] > 10


SHRINK = {"lu_dncnn": ["method.net.depth=3", "method.net.width=8", "method.stages=2"],
          "luser_sw": ["method.solver.max_iter=3", "method.stages=2"],
          "luser_dw": ["method.solver.max_iter=3", "method.stages=2"],
          "deprox": ["method.net.depth=3", "method.net.width=8", "method.solver.max_iter=5"]}


@pytest.mark.parametrize("group,option", [(g, o) for g in ("method", "task", "backward", "trainer", "logger",
                                                             "callbacks", "data") for o in options(g)
                                          if (g, o) != ("trainer", "gpu")])
def test_fast_dev_run_for_every_option(group, option, tmp_path, image_folder, fake_celeba, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    base = TINY_ANY_DATA if group == "data" else TINY
    if group == "method":
        base = [o for o in base if not o.startswith("method.")] + SHRINK.get(option, ["method.net.depth=3",
                                                                                     "method.net.width=8"])
    extra = {"folder": [f"data.root={image_folder}", "data.num_workers=0"],
             "celeba": [f"data.root={fake_celeba}", "data.num_workers=0"]}.get(option, []) if group == "data" else []
    cfg = compose_cfg("train", base + [f"{group}={option}", "+trainer.fast_dev_run=true"] + extra, tmp_path)
    out = train(cfg)
    assert out["test"]["model"]["psnr"] > 0


def test_backward_option_of_another_mode_fails_when_built(tmp_path):
    cfg = compose_cfg("train", ["backward=neumann", "+backward.unroll_steps=3"], tmp_path)
    with pytest.raises(Exception, match=r"takes no option\(s\) \['unroll_steps'\]"):
        hydra.utils.instantiate(cfg.method, _convert_="all")
