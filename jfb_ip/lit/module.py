"""The one LightningModule that trains, validates and tests every method: loss, metrics, logs."""
from __future__ import annotations

import inspect
import logging
import math
import resource
import statistics
import time
import warnings
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..data.sampling import derived_seed
from ..methods import CalibratedMethod, Method, Reconstruction, Wiener
from ..nets import count_parameters
from ..physics import Task
from ..solvers import SolverStats
from .checkpointing import rng_state, set_rng_state
from .distributed import PerImage, distributed, gather_cat, gather_solver_stats, sum_over_processes

log = logging.getLogger(__name__)

# Lightning notes that the module's on_after_batch_transfer is used although a DataModule is passed: that is the
# design (measurements are made by the module, on the device, from the DataModule's clean images), so it is silenced
warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")

# a run in which more of the test samples than this stop at max_iter gets a warning
CAPPED_WARNING_FRACTION = 0.05


class TrainingDiverged(RuntimeError):
    """Every sample of many consecutive batches diverged: training cannot go on."""


def image_metrics(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR and SSIM (data range 1) of the clamped reconstruction -> two (B,) tensors."""
    x_hat = x_hat.clamp(0, 1).to(x.dtype)
    psnr = peak_signal_noise_ratio(x_hat, x, data_range=1.0, dim=(1, 2, 3), reduction="none")
    ssim = structural_similarity_index_measure(x_hat, x, data_range=1.0, reduction="none")
    return psnr, ssim


def psnr_score(x_hat: Tensor, x: Tensor) -> Tensor:
    return image_metrics(x_hat, x)[0]


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


class ReconstructionModule(L.LightningModule):
    """Loss, metrics and logging for any method; the Wiener reference row beside it.

    Args:
        method: a :class:`jfb_ip.methods.Method` (``forward(meas) -> Reconstruction``).
        task: makes measurements from clean batches on the current device.
        optimizer: partial optimizer (``_partial_: true``), called with the parameters.
        scheduler: optional partial LR scheduler, called with the optimizer.
        loss: the training loss ``loss(x_hat, x)`` (an ``nn.Module``; MSE by default); with the
            method's ``aux_loss`` it is also applied to every intermediate stage.
        seed: base seed of the validation/test noise (sample i of split s uses seed + offset_s + i).
        wiener_prior: 'gradient' or 'identity' for the Wiener reference row; its lambda is tuned
            on the validation set every validation epoch and saved in the checkpoint.
        image_log_every_n_epochs: how often validation image grids go to the logger.
        max_skipped_batches: consecutive batches whose every sample diverged before training
            stops with an error (they take no optimizer step).
        fixed_train_noise: seed the training noise per sample index, like validation's, so a
            repeated batch is the same measurement each step (``debug=overfit``).
        gradient_clip_val: clip the gradient norm to this (None: no clipping). Training uses Lightning's manual
            optimization, so that a batch in which every sample diverged takes no step at all (neither
            ``global_step`` nor the schedule moves); Lightning's ``trainer.gradient_clip_val`` does not apply then.
        run_config: the resolved run config, stored in the checkpoint.
    """

    SPLIT_OFFSET = {"val": 1_000_000, "test": 2_000_000}

    def __init__(self, method: Method, task: Task, optimizer: Callable | None = None,
                 scheduler: Callable | None = None, loss: nn.Module | None = None, seed: int = 0,
                 wiener_prior: str = "gradient", image_log_every_n_epochs: int = 1, max_skipped_batches: int = 20,
                 fixed_train_noise: bool = False, gradient_clip_val: float | None = None,
                 run_config: dict | None = None):
        super().__init__()
        # run_config (the resolved Hydra config) travels in the checkpoint so evaluate.py can rebuild the model
        # logger=False: run.py logs the full resolved run config (these keys included) to the loggers itself
        self.save_hyperparameters(ignore=["method", "task", "optimizer", "scheduler", "loss"], logger=False)
        self.method, self.task = method, task
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.loss_fn = loss if loss is not None else nn.MSELoss()
        self.seed = seed
        self.wiener = Wiener(prior=wiener_prior)
        self.val_metrics = MetricCollection({"psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
                                             "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)}, prefix="val/")
        # one PSNR/SSIM pair per intermediate stage of unrolled methods (the last stage is val/psnr)
        self.stage_metrics = nn.ModuleList(
            [self.val_metrics.clone(prefix=f"val/stage{k + 1}_") for k in range(method.n_stages - 1)])
        self.automatic_optimization = False  # see gradient_clip_val
        self.skipped_samples = 0
        self._skipped_in_a_row = 0
        # the calibrated parts inside the method still to tune (None: not looked for yet); see _calibrate_method_parts
        self._untuned_parts: list[CalibratedMethod] | None = None
        self._train_batches = 0  # training batches made so far (all epochs): the key of each step's random stream
        self.test_results: dict[str, Any] = {}
        self.test_examples = None
        self.n_examples = 8  # test images kept for the examples grid (run.py sets grid_images)
        self._step_t0 = 0.0
        self._train_rec: Reconstruction | None = None
        self.channels_last = False  # set by jfb_ip.lit.speed.apply_speed_switches
        # per-step values of this process's training steps, summarised in metrics.json by train_summary()
        self._step_times: list[float] = []
        self._train_sums: dict[str, tuple[float, int]] = {}
        self._peak_memory: tuple[str, int] | None = None

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.method.parameters())

    def _calibrated(self) -> list[CalibratedMethod]:
        """The modules tuned on validation data: the Wiener row, and the method if it is one too (Wiener, TV,
        PnP-ADMM: :class:`~jfb_ip.methods.calibrated.CalibratedMethod`)."""
        return [self.wiener] + ([self.method] if isinstance(self.method, CalibratedMethod) else [])

    def _calibrate_method_parts(self, meas, x: Tensor) -> None:
        """Tune the calibrated parts inside a trained method (DEGRAD's ``initializer=wiener``) on its first training
        batch, once: the map it trains depends on them, so they are fixed before the first step (training data,
        never validation or test; the chosen lambda is a buffer, so a resumed run keeps it)."""
        if self._untuned_parts is None:  # looked for once: no module walk, and no device read of `tuned`, per step
            self._untuned_parts = [m for m in self.method.modules() if isinstance(m, CalibratedMethod)
                                   and m is not self.method and not bool(m.tuned)]
        while self._untuned_parts:
            m = self._untuned_parts.pop()
            with torch.no_grad():
                m.calibrate_start()
                m.calibrate_update(meas, x, psnr_score)
                m.calibrate_end(sum_over_processes(m.scores))  # DDP: every process picks the same lambda
            log.info("%s: lambda %.3g tuned on the first training batch", type(m).__name__, float(m.lam))

    # ------------------------------------------------------------------ measurements
    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Clean images arrive on the device; the measurement is made here, on that device.
        Training noise comes from the global (seeded) RNG; val/test noise is seeded per sample."""
        x, idx = batch
        if self.channels_last:  # the channels_last speed switch (jfb_ip.lit.speed): images in NHWC like the weights
            x = x.contiguous(memory_format=torch.channels_last)
        trainer = self._trainer
        n = getattr(self.task, "problems_per_image", 1)
        if trainer is not None and trainer.training and n > 1:
            # Willingham et al. [4] Alg. 1: N problems per clean image, each degraded its own way, so the batch-mean loss is the
            # mean over the N problems; problem j of image i gets index i*N + j (distinct seeds with fixed noise)
            x, idx = x.repeat_interleave(n, 0), idx.repeat_interleave(n, 0) * n + torch.arange(n).repeat(len(idx)).to(idx)
        if trainer is not None and trainer.training and not self.hparams.fixed_train_noise:
            # every random draw of this training step (its noise, operators, any in the method) comes from a stream
            # keyed by (seed, process, batch number): a run resumed from a checkpoint repeats them exactly
            torch.manual_seed(derived_seed(self.seed, trainer.global_rank, self._train_batches))
            self._train_batches += 1
            return x, self.task.sample(x), idx
        split = "test" if trainer is not None and trainer.testing else "val"
        return x, self.seeded_measurement(x, idx, split), idx

    def seeded_measurement(self, x: Tensor, idx: Tensor, split: str):
        """The measurement of images ``idx`` of the val/test split: noise seeded per image, the same
        whatever the batch (benchmarks use it to see exactly the test split's measurements)."""
        return self.task.sample(x, seeds=idx.to("cpu") + self.seed + self.SPLIT_OFFSET[split])

    def _log_stats(self, split: str, stats: SolverStats | None, batch_size: int, **kw) -> None:
        if stats is None:
            return
        values = {f"{split}/{k}": v for k, v in stats.summary("solver/").items()}
        # the progress bar shows the training solves' mean iterations beside the loss and PSNR
        iters = f"{split}/solver/fwd_iters_mean"
        self.log(iters, values.pop(iters), prog_bar=split == "train", batch_size=batch_size, **kw)
        self.log_dict(values, batch_size=batch_size, **kw)
        for k, part in enumerate(stats.parts or []):
            s = part.summary("")
            self.log_dict({f"{split}/solver/stage{k + 1}_{n}": s[n] for n in ("fwd_iters_mean", "fwd_residual_max",
                                                                             "converged_fraction")},
                          batch_size=batch_size, **kw)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        n = count_parameters(self.method)
        mode = self.method.backward_mode
        extra = f", backward mode: {mode}" if mode else ""
        log.info("method %s: %s trainable parameters%s", type(self.method).__name__, f"{n:,}", extra)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._step_t0 = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        """One optimizer step on the loss of :meth:`training_loss`; none (no ``global_step``, no schedule step)
        when every sample of the batch diverged."""
        loss = self.training_loss(batch)
        if loss is None:
            return None
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return loss.detach()

    def training_loss(self, batch) -> Tensor | None:
        """The training loss over the samples whose solve stayed finite, or None when all diverged (on every
        process, under DDP)."""
        x, meas, _ = batch
        self._calibrate_method_parts(meas, x)
        rec = self.method(meas)
        stats = rec.stats
        ok = torch.isfinite(rec.x.detach().flatten(1)).all(1)
        if stats is not None:
            ok &= ~stats.diverged
            self._log_stats("train", stats, x.shape[0], on_step=True)
            self._accumulate(fwd_iters_mean=stats.iterations.float().mean())
        n_bad = int((~ok).sum())
        # DDP: every process must take the same branch (all skip the step, or all run backward), or the others'
        # gradient all-reduce waits forever; decide on the counts of all processes (one small all-reduce)
        n_bad_all, n_empty = sum_over_processes(torch.tensor([n_bad, int(n_bad == x.shape[0])])).tolist()
        world = torch.distributed.get_world_size() if distributed() else 1
        self.skipped_samples += n_bad_all
        self.log("train/skipped_samples", float(self.skipped_samples), on_step=True)
        if n_empty == world:
            self._skipped_in_a_row += 1
            log.warning("step %d: every sample diverged; no optimizer step (%d such batches in a row)",
                        self.global_step, self._skipped_in_a_row)
            if self._skipped_in_a_row >= self.hparams.max_skipped_batches:
                raise TrainingDiverged(
                    f"every sample of {self._skipped_in_a_row} consecutive training batches diverged (non-finite or "
                    f"beyond solver.bound): lower the learning rate (module.optimizer.lr), or make the fixed-point "
                    f"map contractive (method.net.gamma < 1 with spectral_norm, a smaller step)")
            self._train_rec = None
            return None  # no optimizer step: nothing finite to learn from
        self._skipped_in_a_row = 0
        if n_bad == x.shape[0]:  # only this process's samples all diverged: a zero loss keeps DDP's all-reduce in step
            self._train_rec = None
            # p * 0 per parameter: a fresh zero gradient each. `sum(p.sum()) * 0` hands every 0-d parameter a view of
            # one shared zero, which autograd stores as .grad without copying: DDP's copy-back from its bucket then
            # writes every scalar's averaged gradient into the same memory, and the last one wins on this process
            return sum((p * 0.0).sum() for p in self.method.parameters() if p.requires_grad)
        if n_bad:
            log.warning("step %d: skipped %d diverged/non-finite samples (total %d)", self.global_step, n_bad,
                        self.skipped_samples)
            # the bad samples' non-finite activations would turn the shared weight gradient into
            # NaN (0 * NaN) even when masked out of the loss: redo the step without them
            x, rec = x[ok], self.method(meas.subset(ok))
        self._train_rec = rec
        loss = rec.loss(x, self.loss_fn, self.method.aux_loss)
        if rec.penalty is not None:  # the contraction penalty (included in the loss) and the Lip(T) it measured
            self.log("train/contraction_penalty", rec.penalty.detach(), on_step=True, batch_size=x.shape[0])
            self.log_dict({"train/solver/lipschitz_T_mean": rec.lipschitz.mean(),
                           "train/solver/lipschitz_T_max": rec.lipschitz.max()}, on_step=True, batch_size=x.shape[0])
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=x.shape[0])
        self.log("train/psnr", psnr_score(rec.x.detach(), x).mean(), on_step=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step_s = time.perf_counter() - self._step_t0
        self.log("time/step_s", step_s, on_step=True)
        self._step_times.append(step_s)
        stats = self._train_rec.solver_stats() if self._train_rec is not None else None
        if stats is not None and stats.backward_iterations is not None:  # filled in during backward
            self.log("train/solver/bwd_iters_mean", stats.backward_iterations.float().mean(), on_step=True)
            self.log("train/solver/bwd_residual_max", stats.backward_residual.float().max(), on_step=True)
            self._accumulate(bwd_iters_mean=stats.backward_iterations.float().mean())
        self._train_rec = None
        name, nbytes = step_memory_bytes(self.device)
        self.log(name, float(nbytes), on_step=True)
        if self._peak_memory is None or nbytes > self._peak_memory[1]:
            self._peak_memory = (name, nbytes)

    def _accumulate(self, **values) -> None:
        for k, v in values.items():
            total, n = self._train_sums.get(k, (0.0, 0))
            self._train_sums[k] = (total + float(v), n + 1)

    def train_summary(self) -> dict[str, Any]:
        """metrics.json's per-step means over the training steps this process ran: step time (mean and median,
        without the first step when there are others: it pays one-off set-up costs), forward/backward solver
        iterations, and the peak memory with the name of its measure (``memory/cuda_peak_bytes`` on a GPU,
        ``memory/rss_bytes`` on CPU, sampled after each step)."""
        times = self._step_times[1:] or self._step_times
        out: dict[str, Any] = {
            "step_time_s_mean": sum(times) / len(times) if times else None,
            "step_time_s_median": statistics.median(times) if times else None}
        for k, (total, n) in self._train_sums.items():
            out[k] = total / n
        if self._peak_memory is not None:
            out["peak_memory_bytes"], out["memory_measure"] = self._peak_memory[1], self._peak_memory[0]
        return out

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        for m in self._calibrated():
            m.calibrate_start()
        self._val_images = None

    def validation_step(self, batch, batch_idx: int) -> None:
        x, meas, _ = batch
        rec = self.method(meas)
        self.val_metrics.update(rec.x.clamp(0, 1), x)
        for metrics, out in zip(self.stage_metrics, rec.stages):
            metrics.update(out.clamp(0, 1), x)
        # sync_dist: epoch means over every process's shard (DDP), not rank 0's alone
        self._log_stats("val", rec.stats, x.shape[0], on_epoch=True, sync_dist=True)
        self.log("val/loss", rec.loss(x, self.loss_fn, self.method.aux_loss), on_epoch=True, batch_size=x.shape[0],
                 sync_dist=True)
        for m in self._calibrated():  # tuned on validation data only
            m.calibrate_update(meas, x, psnr_score)
        if batch_idx == 0:
            lipschitz = getattr(self.method, "lipschitz_estimates", None)
            # inference-mode tensors cannot enter autograd (trainer.inference_mode=false allows it)
            if lipschitz is not None and not torch.is_inference_mode_enabled():  # local Lipschitz constants of the network and the map at real inputs
                # eager even with compile=true: the estimate differentiates twice, which compiled graphs cannot
                with torch.compiler.set_stance("force_eager"):
                    estimates = lipschitz(meas, rec=rec)
                self.log_dict({f"val/solver/{k}": v for k, v in estimates.items()}, batch_size=x.shape[0],
                              sync_dist=True)
            self._val_images = (x[:4], meas.as_image()[:4], rec.x[:4].clamp(0, 1))

    def on_validation_epoch_end(self) -> None:
        # torchmetrics' compute() gathers every process's states; sync_dist only averages equal values (DDP)
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()
        for metrics in self.stage_metrics:
            self.log_dict(metrics.compute(), sync_dist=True)
            metrics.reset()
        for m in self._calibrated():
            # the lambda search scores every process's validation shard (DDP): all pick the same lambda
            m.calibrate_end(None if m.scores is None else sum_over_processes(m.scores))
        self.log("val/wiener_lambda", self.wiener.lam, sync_dist=True)
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
    TEST_ROWS = ("measurement", "wiener", "model")

    def on_test_epoch_start(self) -> None:
        # per-image PSNR/SSIM by image index, gathered from every process at the end (DDP: jfb_ip.lit.distributed)
        self._test = PerImage([f"{r}/{m}" for r in self.TEST_ROWS for m in ("psnr", "ssim")]).to(self.device)
        self._test_stats: list[SolverStats] = []
        self.test_examples = None
        self._example_index: Tensor | None = None
        self._test_t = time.perf_counter()

    def test_step(self, batch, batch_idx: int) -> None:
        x, meas, idx = batch
        rec = self.method(meas)
        rows = {"measurement": meas.as_image(), "wiener": self.wiener(meas).x, "model": rec.x}
        values = {}
        for name, img in rows.items():
            values[f"{name}/psnr"], values[f"{name}/ssim"] = image_metrics(img, x)
        self._test.update(idx, values)
        if rec.stats is not None:
            self._test_stats.append(rec.stats)
        have = 0 if self.test_examples is None else self.test_examples[0].shape[0]
        if have < self.n_examples:  # the first n_examples test images (of this process), across batches
            k = self.n_examples - have
            new = (x[:k].cpu(), meas.as_image()[:k].clamp(0, 1).cpu(), rec.x[:k].clamp(0, 1).cpu())
            self.test_examples = new if self.test_examples is None else \
                tuple(torch.cat([a, b]) for a, b in zip(self.test_examples, new))
            self._example_index = torch.cat([t for t in (self._example_index, idx[:k].cpu()) if t is not None])

    def on_test_epoch_end(self) -> None:
        index, rank, vals = self._test.compute()
        res: dict[str, Any] = {}
        for name in self.TEST_ROWS:
            res[name] = {m: float(vals[f"{name}/{m}"].mean()) for m in ("psnr", "ssim")}
            # sync_dist: the same value on every process (from all shards); the mean over processes keeps it
            self.log_dict({f"test/{name}_psnr": res[name]["psnr"], f"test/{name}_ssim": res[name]["ssim"]},
                          sync_dist=True)
        res["per_image"] = {name: {m: vals[f"{name}/{m}"].tolist() for m in ("psnr", "ssim")}
                            for name in self.TEST_ROWS}
        res["wiener_lambda"] = float(self.wiener.lam)
        res["wiener_lambda_tuned_on_val"] = bool(self.wiener.tuned)
        if isinstance(self.method, CalibratedMethod):  # TV, PnP-ADMM: the weight tested (e.g. reused for another prior)
            res["method_lambda"], res["method_lambda_tuned_on_val"] = float(self.method.lam), bool(self.method.tuned)
        stats = gather_solver_stats(self._test_stats)
        if stats:
            res["solver"] = solver_block(stats)
            if self._trainer is None or self._trainer.is_global_zero:  # once, not once per DDP process
                self._warn_if_capped(res["solver"])
        res["n_images"] = int(index.numel())
        res["wall_time_s"] = time.perf_counter() - self._test_t
        if distributed():
            world = torch.distributed.get_world_size()
            # which process tested which image (in per_image order): each shard is a different set of images
            res["distributed"] = {"world_size": world, "rank_of_image": rank.tolist(),
                                  "images_per_rank": torch.bincount(rank, minlength=world).tolist(),
                                  "repeated_images_dropped": self._test.duplicates}
            self._gather_examples()
        self.test_results = res

    def _gather_examples(self) -> None:
        """examples.png under DDP: the first ``n_examples`` test images of the whole split, as in one process."""
        if self.test_examples is None:
            return
        idx = gather_cat(self._example_index.to(self.device))
        parts = [gather_cat(t.to(self.device)).cpu() for t in self.test_examples]
        keep = idx.cpu().argsort()[: self.n_examples]
        self.test_examples = tuple(p[keep] for p in parts)

    def _warn_if_capped(self, block: dict[str, Any]) -> None:
        capped = 1.0 - block["converged_fraction"]
        if capped > CAPPED_WARNING_FRACTION and not math.isnan(capped):
            log.warning("%.0f%% of the test solves stopped at max_iter without reaching tol: the reported x is not an "
                        "equilibrium there; raise solver.max_iter, loosen solver.tol, or try solver=broyden / "
                        "solver.m / solver.beta < 1", 100 * capped)

    # the run state beside the weights that Lightning does not keep: exact resume (README "Faults and resume")
    RUN_STATE_KEY = "jfb_ip_run_state"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[self.RUN_STATE_KEY] = {"skipped_samples": self.skipped_samples,
                                          "skipped_in_a_row": self._skipped_in_a_row,
                                          "train_batches": self._train_batches, "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(self.RUN_STATE_KEY)
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        if state is not None and fitting:  # resuming a training run (evaluate.py only needs the weights)
            self.skipped_samples, self._skipped_in_a_row = state["skipped_samples"], state["skipped_in_a_row"]
            self._train_batches = state["train_batches"]
            set_rng_state(state["rng"])
        self._schedule_from_config(checkpoint)
        sd = checkpoint["state_dict"]
        # checkpoints written before the Wiener row became a method still load
        if "wiener_tuned" in sd:
            sd["wiener.tuned"] = sd.pop("wiener_tuned")
        sd.setdefault("wiener.tuned", torch.tensor(False))

    def _schedule_from_config(self, checkpoint: dict) -> None:
        """Resuming takes the schedule's shape from this run's config, its position from the checkpoint.

        A scheduler's state dict holds its constructor arguments (``T_max``, ``eta_min``, ...), which Lightning would
        restore over the config's: a run resumed with a larger ``trainer.max_steps`` would keep the first run's
        ``T_max`` and restart the learning rate. Those arguments are replaced by this config's here."""
        saved = checkpoint.get("lr_schedulers") or []
        if self.scheduler_fn is None or len(saved) != 1:
            return
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        fresh = self.scheduler_fn(optimizer=probe)
        args = set(inspect.signature(type(fresh).__init__).parameters) - {"self", "optimizer", "last_epoch", "verbose"}
        changed = {k: (saved[0][k], v) for k, v in fresh.state_dict().items()
                   if k in args and k in saved[0] and saved[0][k] != v}
        for k, (old, new) in changed.items():
            saved[0][k] = new
            log.warning("resuming with scheduler %s=%s from this run's config (the checkpoint's run had %s)", k, new,
                        old)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if self.optimizer_fn is None:
            raise ValueError("ReconstructionModule: no optimizer configured (module.optimizer)")
        opt = self.optimizer_fn(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_fn is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer=opt), "interval": "step"}}
