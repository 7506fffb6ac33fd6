"""What a run measures beside the training steps, as Lightning callbacks: the reference rows of the test table
(:class:`ReferenceRows`), the test table itself with its per-image values, solver block and examples
(:class:`TestTable`), and the per-step time, memory and solver iterations of training (:class:`TrainingStats`).
The drivers (:mod:`jfb_ip.lit.run`) attach all three to every run, whatever the ``callbacks`` group holds."""
from __future__ import annotations

import logging
import math
import resource
import statistics
import time
from typing import Any, Mapping

import lightning as L
import torch
from torch import Tensor, nn

from ..methods import CalibratedMethod
from ..nets import count_parameters
from ..solvers import SolverStats
from .calibration import calibrate_end, image_metrics, psnr_score
from .distributed import PerImage, distributed, gather_cat, gather_solver_stats

log = logging.getLogger(__name__)

# a run in which more of the test samples than this stop at max_iter gets a warning
CAPPED_WARNING_FRACTION = 0.05


class ReferenceRows(L.Callback):
    """Rows of the test table beside the model's: methods with nothing to train (Wiener, TV, ...), each with its
    weight chosen on the validation split (every validation epoch, never on test) and tested on the same
    measurements as the model. Their chosen weights are this callback's state, saved in every checkpoint.

    Args:
        references: row name -> :class:`~jfb_ip.methods.CalibratedMethod` (``conf/train.yaml``'s ``references``:
            ``wiener``, and ``tv`` where a TV weight is stored for the task and data); a None value is no row.
    """

    def __init__(self, references: Mapping[str, CalibratedMethod | None] | None = None):
        super().__init__()
        self.references = nn.ModuleDict({k: v for k, v in (references or {}).items() if v is not None})
        for name, m in self.references.items():
            if not isinstance(m, CalibratedMethod):
                raise ValueError(f"references.{name}: a reference row is a method with nothing to train (Wiener, TV, "
                                 f"PnP-ADMM), got {type(m).__name__}")
            if name in ("measurement", "model"):
                raise ValueError(f"references.{name}: the test table's own row names are measurement and model")

    @property
    def state_key(self) -> str:
        return "ReferenceRows"

    @property
    def names(self) -> list[str]:
        return list(self.references)

    @property
    def tuned(self) -> bool:
        """Whether every reference's weight has been chosen on validation data (or needs no search)."""
        return all(bool(m.tuned) or not m.lambda_grid for m in self.references.values())

    def rows(self, meas) -> dict[str, Tensor]:
        return {name: m(meas).x for name, m in self.references.items()}

    def summary(self) -> dict[str, Any]:
        """metrics.json's ``<name>_lambda`` and ``<name>_lambda_tuned_on_val`` of every reference."""
        out: dict[str, Any] = {}
        for name, m in self.references.items():
            out[f"{name}_lambda"], out[f"{name}_lambda_tuned_on_val"] = float(m.lam), bool(m.tuned)
        return out

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.references.to(pl_module.device)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        for m in self.references.values():
            m.calibrate_start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        x, meas, _ = batch
        for m in self.references.values():
            m.calibrate_update(meas, x, psnr_score)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        for name, m in self.references.items():
            calibrate_end(m)
            pl_module.log(f"val/{name}_lambda", m.lam, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        return {name: m.state_dict() for name, m in self.references.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, m in self.references.items():
            if name in state_dict:
                m.load_state_dict(state_dict[name])


def solver_block(stats: list[SolverStats]) -> dict[str, Any]:
    """metrics.json's "solver" block over all test samples: iterations, residuals, diverged count,
    converged fraction; for staged solves (LUSER) a "stages" list with the same keys per stage."""
    def block(items: list[SolverStats]) -> dict[str, Any]:
        cat = lambda name: torch.cat([getattr(s, name).detach().cpu() for s in items])  # noqa: E731
        it, res, div, conv = cat("iterations").float(), cat("residual").double(), cat("diverged"), cat("converged")
        finite = res[torch.isfinite(res)]
        return {"fwd_iters_mean": it.mean().item(), "fwd_iters_max": int(it.max().item()),
                "fwd_residual_mean": finite.mean().item() if finite.numel() else None,
                "fwd_residual_max": finite.max().item() if finite.numel() else None,
                "diverged": int(div.sum().item()), "converged_fraction": conv.float().mean().item(),
                "n_samples": int(it.numel())}

    out = block(stats)
    if stats[0].parts:
        out["stages"] = [block([s.parts[k] for s in stats]) for k in range(len(stats[0].parts))]
        # per sample-stage, as the converged fraction of a nested solve is meant
        out["converged_fraction"] = float(sum(b["converged_fraction"] for b in out["stages"]) / len(out["stages"]))
    return out


class TestTable(L.Callback):
    """The test table: per-image PSNR/SSIM of the measurement, each reference row and the model, gathered from
    every process by image index (DDP: :mod:`jfb_ip.lit.distributed`), the solver block of the model's solves,
    and the first ``n_examples`` test images (truth / measurement / reconstruction) for ``examples.png``.
    After ``trainer.test`` the table is :attr:`results` (metrics.json's ``"test"``) and the images :attr:`examples`.

    Reads the model's output of ``ReconstructionModule.test_step`` (``{"x": ..., "stats": ...}``)."""

    def __init__(self, references: ReferenceRows | None = None, n_examples: int = 8):
        super().__init__()
        self.references = references
        self.n_examples = n_examples
        self.results: dict[str, Any] = {}
        self.examples: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def rows(self) -> list[str]:
        return ["measurement", *(self.references.names if self.references is not None else []), "model"]

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._values = PerImage([f"{r}/{m}" for r in self.rows for m in ("psnr", "ssim")]).to(pl_module.device)
        self._stats: list[SolverStats] = []
        self.examples = None
        self._example_index: Tensor | None = None
        self._t0 = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        x, meas, idx = batch
        rows = {"measurement": meas.as_image(),
                **(self.references.rows(meas) if self.references is not None else {}), "model": outputs["x"]}
        values = {}
        for name, img in rows.items():
            values[f"{name}/psnr"], values[f"{name}/ssim"] = image_metrics(img, x)
        self._values.update(idx, values)
        if outputs.get("stats") is not None:
            self._stats.append(outputs["stats"])
        have = 0 if self.examples is None else self.examples[0].shape[0]
        if have < self.n_examples:  # the first n_examples test images (of this process), across batches
            k = self.n_examples - have
            new = (x[:k].cpu(), meas.as_image()[:k].clamp(0, 1).cpu(), outputs["x"][:k].clamp(0, 1).cpu())
            self.examples = new if self.examples is None else tuple(torch.cat([a, b]) for a, b in zip(self.examples, new))
            self._example_index = torch.cat([t for t in (self._example_index, idx[:k].cpu()) if t is not None])

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        index, rank, vals = self._values.compute()
        res: dict[str, Any] = {}
        for name in self.rows:
            res[name] = {m: float(vals[f"{name}/{m}"].mean()) for m in ("psnr", "ssim")}
            # sync_dist: the same value on every process (from all shards); the mean over processes keeps it
            pl_module.log_dict({f"test/{name}_psnr": res[name]["psnr"], f"test/{name}_ssim": res[name]["ssim"]},
                               sync_dist=True)
        res["per_image"] = {name: {m: vals[f"{name}/{m}"].tolist() for m in ("psnr", "ssim")} for name in self.rows}
        if self.references is not None:
            res.update(self.references.summary())
        method = pl_module.method
        if isinstance(method, CalibratedMethod):  # TV, PnP-ADMM: the weight tested (e.g. reused for another prior)
            res["method_lambda"], res["method_lambda_tuned_on_val"] = float(method.lam), bool(method.tuned)
        stats = gather_solver_stats(self._stats)
        if stats:
            res["solver"] = solver_block(stats)
            if trainer.is_global_zero:  # once, not once per DDP process
                warn_if_capped(res["solver"])
        res["n_images"] = int(index.numel())
        res["wall_time_s"] = time.perf_counter() - self._t0
        if distributed():
            world = torch.distributed.get_world_size()
            # which process tested which image (in per_image order): each shard is a different set of images
            res["distributed"] = {"world_size": world, "rank_of_image": rank.tolist(),
                                  "images_per_rank": torch.bincount(rank, minlength=world).tolist(),
                                  "repeated_images_dropped": self._values.duplicates}
            self._gather_examples(pl_module.device)
        self.results = res

    def _gather_examples(self, device: torch.device) -> None:
        """examples.png under DDP: the first ``n_examples`` test images of the whole split, as in one process."""
        if self.examples is None:
            return
        idx = gather_cat(self._example_index.to(device))
        parts = [gather_cat(t.to(device)).cpu() for t in self.examples]
        keep = idx.cpu().argsort()[: self.n_examples]
        self.examples = tuple(p[keep] for p in parts)


def warn_if_capped(block: dict[str, Any]) -> None:
    capped = 1.0 - block["converged_fraction"]
    if capped > CAPPED_WARNING_FRACTION and not math.isnan(capped):
        log.warning("%.0f%% of the test solves stopped at max_iter without reaching tol: the reported x is not an "
                    "equilibrium there; raise solver.max_iter, loosen solver.tol, or try solver=broyden / "
                    "solver.m / solver.beta < 1", 100 * capped)


def step_memory_bytes(device: torch.device) -> tuple[str, int]:
    """(name, bytes): peak allocated CUDA memory of this step on a GPU (reset at step start),
    else the process's current resident set size (read from /proc; peak RSS never falls)."""
    if device.type == "cuda":
        return "memory/cuda_peak_bytes", torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/statm") as fh:
            return "memory/rss_bytes", int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return "memory/max_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TrainingStats(L.Callback):
    """Per-step time, memory and solver iterations of this process's training steps, logged each step and
    summarised for metrics.json's ``"train"`` block by :meth:`summary`. Reads the output of
    ``ReconstructionModule.training_step`` (``fwd_stats``: the step's forward solves; ``stats``: those of the
    reconstruction trained on, with the backward solve's iterations)."""

    def __init__(self):
        super().__init__()
        self._step_times: list[float] = []
        self._sums: dict[str, tuple[float, int]] = {}
        self._peak_memory: tuple[str, int] | None = None
        self._t0 = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        method = pl_module.method
        extra = f", backward mode: {method.backward_mode}" if method.backward_mode else ""
        log.info("method %s: %s trainable parameters%s", type(method).__name__, f"{count_parameters(method):,}", extra)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step_s = time.perf_counter() - self._t0
        pl_module.log("time/step_s", step_s, on_step=True)
        self._step_times.append(step_s)
        outputs = outputs or {}
        if outputs.get("fwd_stats") is not None:
            self._accumulate(fwd_iters_mean=outputs["fwd_stats"].iterations.float().mean())
        stats = outputs.get("stats")
        if stats is not None and stats.backward_iterations is not None:  # filled in during backward
            pl_module.log("train/solver/bwd_iters_mean", stats.backward_iterations.float().mean(), on_step=True)
            pl_module.log("train/solver/bwd_residual_max", stats.backward_residual.float().max(), on_step=True)
            self._accumulate(bwd_iters_mean=stats.backward_iterations.float().mean())
        name, nbytes = step_memory_bytes(pl_module.device)
        pl_module.log(name, float(nbytes), on_step=True)
        if self._peak_memory is None or nbytes > self._peak_memory[1]:
            self._peak_memory = (name, nbytes)

    def _accumulate(self, **values) -> None:
        for k, v in values.items():
            total, n = self._sums.get(k, (0.0, 0))
            self._sums[k] = (total + float(v), n + 1)

    def summary(self) -> dict[str, Any]:
        """metrics.json's per-step means over the training steps this process ran: step time (mean and median,
        without the first step when there are others: it pays one-off set-up costs), forward/backward solver
        iterations, and the peak memory with the name of its measure (``memory/cuda_peak_bytes`` on a GPU,
        ``memory/rss_bytes`` on CPU, sampled after each step)."""
        times = self._step_times[1:] or self._step_times
        out: dict[str, Any] = {
            "step_time_s_mean": sum(times) / len(times) if times else None,
            "step_time_s_median": statistics.median(times) if times else None}
        for k, (total, n) in self._sums.items():
            out[k] = total / n
        if self._peak_memory is not None:
            out["peak_memory_bytes"], out["memory_measure"] = self._peak_memory[1], self._peak_memory[0]
        return out
