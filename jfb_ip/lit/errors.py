"""The errors a user can fix, and the guard that turns them into one line (or, in a sweep, a failed job that lets the
others run)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from ..checkpoint import CheckpointError
from ..data import DatasetError
from .outputs import write_metrics

__all__ = ["ConfigError", "CheckpointError", "JobFailed", "TrainingDiverged", "main_guard", "user_error"]

log = logging.getLogger(__name__)

# the exit status of a run stopped by SIGTERM: 128 + the signal number, the shell's convention for a killed process
SIGTERM_STATUS = 143


class ConfigError(ValueError):
    """A config that cannot work; the message says what to change."""


class TrainingDiverged(RuntimeError):
    """Every sample of many consecutive batches diverged: training cannot go on."""


class JobFailed(RuntimeError):
    """A job of a search (``optimized_metric`` set) stopped by an error a user can fix. It is logged and recorded in
    the job's ``metrics.json`` (``"error"``), then raised as an ordinary exception rather than SystemExit: Hydra's
    launchers catch it per job, so the study's other trials still run."""


class FailedJobs(Callback):
    """A Hydra callback (conf/hydra/default.yaml): at the end of a multirun, the jobs of this sweep whose
    ``metrics.json`` holds an ``"error"`` in one line, and exit status 1. A failed job returns normally after writing
    its error (see :func:`main_guard`), so every launcher runs the others, and the sweep ends here instead of in
    Hydra's traceback of the first failed job. Under torchrun every process runs the sweep, but only global rank 0
    writes metrics.json: the other ranks could reach the end of the sweep before rank 0 has written the last job's,
    so only rank 0 checks."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        started = getattr(self, "started", 0.0)
        sweep = Path(config.hydra.sweep.dir)
        jobs = [d for d in sweep.iterdir() if (d / ".hydra").is_dir() and (d / ".hydra").stat().st_mtime >= started] \
            if sweep.is_dir() else []
        failed = []
        for job in sorted(jobs, key=lambda d: d.name):
            metrics = job / "metrics.json"
            try:
                payload = json.loads(metrics.read_text())
            except (OSError, ValueError):
                failed.append(f"{job} (no metrics.json)")
                continue
            if isinstance(payload, dict) and "error" in payload and "objective" not in payload:
                failed.append(f"{metrics} ({payload.get('error_type', 'error')})")
        if failed:
            sys.stderr.write(f"error: {len(failed)} of {len(jobs)} jobs failed, each with its error in its "
                             f"metrics.json: {'; '.join(failed)}\n")
            sys.exit(1)


def innermost(e: BaseException) -> BaseException:
    """The innermost exception of a chain (Hydra wraps errors raised while instantiating)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error a user can fix (None for a bug, which keeps its traceback)."""
    if isinstance(e, (ConfigError, CheckpointError, DatasetError, TrainingDiverged)):
        return str(e)
    if isinstance(e, InstantiationException):
        cause = innermost(e)
        return str(cause) if cause is not e else str(e).strip().splitlines()[-1]
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"out of memory ({first[:200]}): lower data.batch_size or data.image_size, or pick a cheaper "
                f"backward= mode")
    return None


def hydra_mode_and_direction() -> tuple[bool, str]:
    """(whether this job is part of a multirun, the sweeper's optimisation direction: 'maximize' unless set)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return False, "maximize"
    direction = hc.sweeper.get("direction", "maximize")  # Optuna's sweeper holds an enum (Direction.maximize)
    direction = str(getattr(direction, "name", direction)).lower()
    return hc.mode == RunMode.MULTIRUN, "minimize" if direction.endswith("minimize") else "maximize"


def finish_wandb(exit_code: int) -> None:
    """End this job's wandb run. Lightning's WandbLogger never calls ``wandb.finish()``, and a later
    WandbLogger in the same process (the next job of a multirun) would log into the still-open run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def main_guard(fn, cfg: DictConfig) -> Any:
    """Run ``fn(cfg)`` as a Hydra job: the errors a user can fix become one clear line instead of a traceback, and
    the job's wandb run is finished either way.

    In a multirun a failed job writes ``metrics.json`` with ``"error"`` and returns, so the sweep goes on;
    :class:`FailedJobs` names the failed jobs in one line at its end (in a search it raises :class:`JobFailed`). In a search (``optimized_metric`` set, ``hparams_search=optuna``) a job that diverged or ran out
    of memory returns the worst value for the sweeper's direction (-inf when maximizing) instead: the study records
    the trial as bad and goes on (lightning-hydra-template returns the metric the same way)."""
    try:
        out = fn(cfg)
    except SIGTERMException:
        # Lightning stops at the end of a step on SIGTERM (the on-exception checkpoint holds that state) and exits
        # with SystemExit(None), status 0: a scheduler and a sweep would count the job as finished. 128 + 15 instead
        finish_wandb(exit_code=SIGTERM_STATUS)
        log.error("stopped by SIGTERM: no metrics.json; resume with ckpt_path=<the on_exception*.ckpt logged above>")
        raise SystemExit(SIGTERM_STATUS) from None
    except BaseException as e:
        finish_wandb(exit_code=1)
        message = user_error(e)
        if message is None:
            raise
        log.error("%s", message)
        multirun, direction = hydra_mode_and_direction()
        if not multirun:
            raise SystemExit(f"error: {message}") from None
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next job of this process needs the memory back
        payload: dict[str, Any] = {"error": message, "error_type": type(e).__name__}
        recoverable = isinstance(e, (TrainingDiverged, torch.OutOfMemoryError, MemoryError))
        if cfg.get("optimized_metric") and recoverable:
            payload["objective"] = float("-inf") if direction == "maximize" else float("inf")
            write_metrics(Path(cfg.paths.output_dir), payload)
            return payload["objective"]
        write_metrics(Path(cfg.paths.output_dir), payload)
        if cfg.get("optimized_metric"):  # a search: the sweeper must see a failed trial, not a missing value
            raise JobFailed(message) from None
        return None  # the sweep goes on; FailedJobs names this job at its end
    finish_wandb(exit_code=0)
    return out
