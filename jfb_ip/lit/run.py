"""What train.py and evaluate.py do, as functions of a composed Hydra config."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from ..data import DatasetNotFoundError
from .module import ReconstructionModule

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot work; the message says what to change."""


def _instantiate_dict(cfg: DictConfig | None) -> list:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig, run_config: dict | None = None) -> ReconstructionModule:
    method = hydra.utils.instantiate(cfg.method, _convert_="all")
    task = hydra.utils.instantiate(cfg.task)
    module_cfg = cfg.get("module")
    module = hydra.utils.instantiate(module_cfg, method=method, task=task) if module_cfg else \
        ReconstructionModule(method, task, optimizer=None)
    # set after instantiation: the config holds _target_ keys that instantiate must not build
    module.hparams["run_config"] = run_config
    return module


def format_table(results: dict[str, Any]) -> str:
    rows = [k for k in ("measurement", "wiener", "model") if k in results]
    lines = [f"{'test (' + str(results.get('n_images', '?')) + ' images)':<24}{'PSNR [dB]':>10}{'SSIM':>8}"]
    lines += [f"{r:<24}{results[r]['psnr']:>10.2f}{results[r]['ssim']:>8.4f}" for r in rows]
    return "\n".join(lines)


def write_metrics(out_dir: Path, payload: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def _trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, save ``<run dir>/checkpoints/last.ckpt``, test, write ``metrics.json``."""
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, run_config)
    trainer = _trainer(cfg, _instantiate_dict(cfg.get("callbacks")), _instantiate_dict(cfg.get("logger")))
    fit_s = 0.0
    last = out_dir / "checkpoints" / "last.ckpt"
    if cfg.get("train", True):
        if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; give the checkpoint of the run to resume "
                              f"(e.g. <run dir>/checkpoints/last.ckpt)")
        if not cfg.get("ckpt_path") and last.is_file():
            # Lightning resumes a run directory's last.ckpt on its own (fault tolerance); say so
            log.warning("resuming from %s (this run directory already holds it)", last)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_s = time.perf_counter() - t0
        if trainer.interrupted:
            log.warning("training was interrupted; resume with ckpt_path=%s", last)
        elif not bool(module.wiener_tuned) and not trainer.fast_dev_run:
            # no validation epoch ran (short run): validate once so the Wiener baseline is tuned
            # on validation data, never on the test set
            trainer.validate(module, datamodule=datamodule, verbose=False)
        if not trainer.fast_dev_run:
            trainer.save_checkpoint(last)
    payload: dict[str, Any] = {"config": {k: v for k, v in run_config.items() if k in ("method", "task", "backward", "data", "seed")}}
    if cfg.get("test", True):
        trainer.test(module, datamodule=datamodule, verbose=False)
        payload["test"] = module.test_results
        print("\n" + format_table(module.test_results) + "\n")
    payload["train"] = {"wall_time_s": fit_s, "steps": trainer.global_step, "skipped_samples": module.skipped_samples}
    payload["wall_time_s"] = time.perf_counter() - t0
    path = write_metrics(out_dir, payload)
    log.info("metrics written to %s", path)
    for lg in trainer.loggers:  # the test table also in the wandb run summary, for dashboards
        if isinstance(lg, WandbLogger) and "test" in payload:
            for row in ("measurement", "wiener", "model"):
                for k, v in payload["test"][row].items():
                    lg.experiment.summary[f"test/{row}_{k}"] = v
    return payload


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the model of a checkpoint, test it on the seeded test split, write
    ``metrics.json`` and ``examples.png`` (rows: truth / measurement / reconstruction)."""
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist (a run writes <run dir>/checkpoints/last.ckpt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    train_cfg = (ckpt.get("hyper_parameters") or {}).get("run_config")
    if not train_cfg:
        raise ConfigError(f"{path} holds no jfb-ip run config; was it written by train.py?")
    train_cfg = OmegaConf.create(train_cfg)
    L.seed_everything(cfg.seed, workers=True)
    data_cfg = cfg.data if cfg.get("data") else train_cfg.data
    if int(data_cfg.channels) != int(train_cfg.data.channels):
        log.warning("data.channels=%s overridden by the model's %s channels", data_cfg.channels, train_cfg.data.channels)
        data_cfg = OmegaConf.merge(data_cfg, {"channels": train_cfg.data.channels})
    datamodule = hydra.utils.instantiate(data_cfg)
    module = build_module(OmegaConf.create({"method": train_cfg.method, "task": train_cfg.task,
                                            "module": train_cfg.get("module")}), ckpt["hyper_parameters"]["run_config"])
    module.load_state_dict(ckpt["state_dict"])
    trainer = _trainer(cfg, [], _instantiate_dict(cfg.get("logger")))
    trainer.test(module, datamodule=datamodule, verbose=False)
    out_dir = Path(cfg.paths.output_dir)
    payload = {"ckpt_path": str(path), "data": OmegaConf.to_container(data_cfg, resolve=True),
               "test": module.test_results}
    write_metrics(out_dir, payload)
    if module.test_examples is not None:
        import torchvision

        x, y, xh = (t[: cfg.grid_images] for t in module.test_examples)
        torchvision.utils.save_image(torch.cat([x, y, xh]).float(), out_dir / "examples.png", nrow=x.shape[0], padding=2)
    print("\n" + format_table(module.test_results) + "\n")
    return payload


def main_guard(fn, cfg: DictConfig) -> Any:
    """Turn the errors a user can fix into one clear line instead of a traceback."""
    try:
        return fn(cfg)
    except (ConfigError, DatasetNotFoundError) as e:
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None
