"""The one LightningModule that trains, validates and tests every method."""
from __future__ import annotations

import logging
import resource
import time
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..methods import Method, Wiener
from ..methods.classical import default_lambda_grid
from ..nets import count_parameters
from ..physics import Task
from ..solvers import SolverStats

log = logging.getLogger(__name__)


def image_metrics(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR and SSIM (data range 1) of the clamped reconstruction -> two (B,) tensors."""
    x_hat = x_hat.clamp(0, 1).to(x.dtype)
    psnr = peak_signal_noise_ratio(x_hat, x, data_range=1.0, dim=(1, 2, 3), reduction="none")
    ssim = structural_similarity_index_measure(x_hat, x, data_range=1.0, reduction="none")
    return psnr, ssim


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


class ReconstructionModule(L.LightningModule):
    """Loss, metrics, solver logging and the measurement/Wiener baselines for any method.

    Args:
        method: a :class:`jfb_ip.methods.Method` (``forward(meas) -> (x_hat, stats)``).
        task: makes measurements from clean batches on the current device.
        optimizer: partial optimizer (``_partial_: true``), called with the parameters.
        scheduler: optional partial LR scheduler, called with the optimizer.
        seed: base seed of the validation/test noise (sample i of split s uses seed + offset_s + i).
        wiener_prior: 'gradient' or 'identity' for the Wiener baseline; its lambda is tuned on
            the validation set every validation epoch and saved in the checkpoint.
        run_config: the resolved run config, stored in the checkpoint.
    """

    SPLIT_OFFSET = {"val": 1_000_000, "test": 2_000_000}

    def __init__(self, method: Method, task: Task, optimizer: Callable, scheduler: Callable | None = None,
                 seed: int = 0, wiener_prior: str = "gradient", image_log_every_n_epochs: int = 1,
                 run_config: dict | None = None):
        super().__init__()
        # run_config (the resolved Hydra config) travels in the checkpoint so evaluate.py can rebuild the model
        self.save_hyperparameters(ignore=["method", "task", "optimizer", "scheduler"])
        self.method, self.task = method, task
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.seed = seed
        self.wiener = Wiener(lam=1e-2, prior=wiener_prior)
        # set once the Wiener lambda has been tuned on validation data (saved in checkpoints)
        self.register_buffer("wiener_tuned", torch.tensor(False))
        self.lambda_grid = list(default_lambda_grid())
        self.val_metrics = MetricCollection({"psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
                                             "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)}, prefix="val/")
        # one PSNR/SSIM pair per intermediate stage of unrolled methods (the last stage is val/psnr)
        n_stages = getattr(method, "n_stages", 1)
        self.stage_metrics = nn.ModuleList(
            [self.val_metrics.clone(prefix=f"val/stage{k + 1}_") for k in range(n_stages - 1)])
        self.skipped_samples = 0
        self.test_results: dict[str, Any] = {}
        self._step_t0 = 0.0

    # ------------------------------------------------------------------ measurements
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Clean images arrive on the device; the measurement is made here, on that device.
        Training noise comes from the global (seeded) RNG; val/test noise is seeded per sample."""
        x, idx = batch
        trainer = self._trainer
        if trainer is not None and trainer.training:
            return x, self.task.sample(x), idx
        split = "test" if trainer is not None and trainer.testing else "val"
        seeds = idx.to("cpu") + self.seed + self.SPLIT_OFFSET[split]
        return x, self.task.sample(x, seeds=seeds), idx

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        n = count_parameters(self.method)
        mode = getattr(self.method, "backward_mode", None)
        extra = f", backward mode: {mode}" if mode else ""
        log.info("method %s: %s trainable parameters%s", type(self.method).__name__, f"{n:,}", extra)
        print(f"[jfb-ip] {type(self.method).__name__}: {n:,} trainable parameters{extra}")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._step_t0 = time.perf_counter()

    def training_step(self, batch, batch_idx: int):
        x, meas, _ = batch
        x_hat, stats = self.method(meas)
        self._train_stats = stats  # backward stats are filled in during backward; logged at batch end
        ok = torch.isfinite(x_hat.detach().flatten(1)).all(1)
        if stats is not None:
            ok &= ~stats.diverged
            self.log_dict({f"train/{k}": v for k, v in stats.summary("solver/").items()}, on_step=True)
        n_bad = int((~ok).sum())
        if n_bad:
            self.skipped_samples += n_bad
            log.warning("step %d: skipped %d diverged/non-finite samples (total %d)", self.global_step, n_bad,
                        self.skipped_samples)
        self.log("train/skipped_samples", float(self.skipped_samples), on_step=True)
        if not bool(ok.any()):
            return None  # Lightning skips the optimizer step: nothing finite to learn from
        loss = F.mse_loss(x_hat[ok], x[ok])
        stages = self.method.stage_outputs
        if self.method.aux_loss and stages and len(stages) > 1:
            loss = loss + sum(F.mse_loss(s[ok], x[ok]) for s in stages[:-1])
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.log("time/step_s", time.perf_counter() - self._step_t0, on_step=True)
        stats = getattr(self, "_train_stats", None)
        if stats is not None and stats.parts:
            stats = SolverStats.merge(stats.parts)  # per-stage backward stats exist only now
        if stats is not None and stats.backward_iterations is not None:
            self.log("train/solver/bwd_iters_mean", stats.backward_iterations.float().mean(), on_step=True)
            self.log("train/solver/bwd_residual_max", stats.backward_residual.float().max(), on_step=True)
        name, nbytes = step_memory_bytes(self.device)
        self.log(name, float(nbytes), on_step=True)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._lam_psnr = torch.zeros(len(self.lambda_grid), dtype=torch.float64)
        self._val_images = None

    def validation_step(self, batch, batch_idx: int) -> None:
        x, meas, _ = batch
        x_hat, stats = self.method(meas)
        self.val_metrics.update(x_hat.clamp(0, 1), x)
        for metrics, out in zip(self.stage_metrics, self.method.stage_outputs or []):
            metrics.update(out.clamp(0, 1), x)
        if stats is not None:
            self.log_dict({f"val/{k}": v for k, v in stats.summary("solver/").items()}, on_epoch=True,
                          batch_size=x.shape[0])
        for i, lam in enumerate(self.lambda_grid):  # tune the Wiener baseline on validation data only
            psnr = image_metrics(meas.tikhonov(lam, self.wiener.prior), x)[0]
            self._lam_psnr[i] += psnr.sum().double().cpu()
        if batch_idx == 0:
            self._val_images = (x[:4], meas.as_image()[:4], x_hat[:4].clamp(0, 1))

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        for metrics in self.stage_metrics:
            self.log_dict(metrics.compute())
            metrics.reset()
        self.wiener.lam.fill_(self.lambda_grid[int(self._lam_psnr.argmax())])
        self.wiener_tuned.fill_(True)
        self.log("val/wiener_lambda", self.wiener.lam)
        self._log_images("val/examples", self._val_images)

    def _log_images(self, key: str, images) -> None:
        """Truth / measurement / reconstruction grids, where the logger can show images."""
        logger = self.logger
        if images is None or logger is None or not hasattr(logger, "log_image"):
            return
        if self.current_epoch % max(self.hparams.image_log_every_n_epochs, 1):
            return
        import torchvision

        grid = torchvision.utils.make_grid(torch.cat(images).float().cpu(), nrow=images[0].shape[0])
        logger.log_image(key=key, images=[grid], caption=["rows: truth / measurement / reconstruction"])

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self) -> None:
        self._test = {k: {"psnr": [], "ssim": []} for k in ("measurement", "wiener", "model")}
        self._test_stats: list[dict[str, float]] = []
        self.test_examples = None
        self._test_t = time.perf_counter()

    def test_step(self, batch, batch_idx: int) -> None:
        x, meas, _ = batch
        x_hat, stats = self.method(meas)
        rows = {"measurement": meas.as_image(), "wiener": self.wiener(meas)[0], "model": x_hat}
        for name, img in rows.items():
            psnr, ssim = image_metrics(img, x)
            self._test[name]["psnr"] += psnr.tolist()
            self._test[name]["ssim"] += ssim.tolist()
        if stats is not None:
            self._test_stats.append(stats.summary(""))
        if batch_idx == 0:
            self.test_examples = (x[:8].cpu(), meas.as_image()[:8].clamp(0, 1).cpu(), x_hat[:8].clamp(0, 1).cpu())

    def on_test_epoch_end(self) -> None:
        res: dict[str, Any] = {}
        for name, vals in self._test.items():
            res[name] = {"psnr": float(torch.tensor(vals["psnr"]).mean()), "ssim": float(torch.tensor(vals["ssim"]).mean())}
            self.log_dict({f"test/{name}_psnr": res[name]["psnr"], f"test/{name}_ssim": res[name]["ssim"]})
        res["per_image"] = {name: vals for name, vals in self._test.items()}
        res["wiener_lambda"] = float(self.wiener.lam)
        res["wiener_lambda_tuned_on_val"] = bool(self.wiener_tuned)
        if self._test_stats:
            keys = self._test_stats[0].keys()
            res["solver"] = {k: float(sum(s[k] for s in self._test_stats) / len(self._test_stats)) for k in keys}
        res["n_images"] = len(self._test["model"]["psnr"])
        res["wall_time_s"] = time.perf_counter() - self._test_t
        self.test_results = res
        self._log_images("test/examples", self.test_examples)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints written before the flag existed still load
        checkpoint["state_dict"].setdefault("wiener_tuned", torch.tensor(False))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opt = self.optimizer_fn(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_fn is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer=opt), "interval": "step"}}
