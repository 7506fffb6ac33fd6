"""The one LightningModule that trains, validates and tests every method: measurements, loss, metrics, logs.
What is not a step lives beside it: reference rows, the test table and training statistics in
:mod:`jfb_ip.lit.callbacks`, the weight searches in :mod:`jfb_ip.lit.calibration`."""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..data.sampling import derived_seed
from ..methods import CalibratedMethod, Method, Reconstruction
from ..physics import Task
from ..solvers import SolverStats
from .calibration import FirstBatchCalibration, calibrate_end, psnr_score
from .checkpointing import schedule_from_config
from .distributed import distributed, sum_over_processes
from .errors import TrainingDiverged

__all__ = ["ReconstructionModule"]

log = logging.getLogger(__name__)

# Lightning notes that the module's on_after_batch_transfer is used although a DataModule is passed: that is the
# design (measurements are made by the module, on the device, from the DataModule's clean images), so it is silenced
warnings.filterwarnings("ignore", message="You have overridden `on_after_batch_transfer`")


class ReconstructionModule(L.LightningModule):
    """Loss, metrics and logging for any method.

    Args:
        method: a :class:`jfb_ip.methods.Method` (``forward(meas) -> Reconstruction``).
        task: makes measurements from clean batches on the current device.
        optimizer: partial optimizer (``_partial_: true``), called with the parameters.
        scheduler: optional partial LR scheduler, called with the optimizer.
        loss: the training loss ``loss(x_hat, x)`` (an ``nn.Module``; MSE by default); with the
            method's ``aux_loss`` it is also applied to every intermediate stage.
        seed: base seed of the validation/test noise (sample i of split s uses seed + offset_s + i).
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
                 image_log_every_n_epochs: int = 1, max_skipped_batches: int = 20,
                 fixed_train_noise: bool = False, gradient_clip_val: float | None = None,
                 run_config: dict | None = None):
        super().__init__()
        # run_config (the resolved Hydra config) travels in the checkpoint so evaluate.py can rebuild the model
        # logger=False: the driver logs the full resolved run config (these keys included) to the loggers itself
        self.save_hyperparameters(ignore=["method", "task", "optimizer", "scheduler", "loss"], logger=False)
        self.method, self.task = method, task
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.loss_fn = loss if loss is not None else nn.MSELoss()
        self.seed = seed
        self.val_metrics = MetricCollection({"psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
                                             "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)}, prefix="val/")
        # one PSNR/SSIM pair per intermediate stage of unrolled methods (the last stage is val/psnr)
        self.stage_metrics = nn.ModuleList(
            [self.val_metrics.clone(prefix=f"val/stage{k + 1}_") for k in range(method.n_stages - 1)])
        self.automatic_optimization = False  # see gradient_clip_val
        self.calibrate_parts = FirstBatchCalibration(method)
        self.skipped_samples = 0
        self._skipped_in_a_row = 0
        self._train_batches = 0  # training batches made so far (all epochs): the key of each step's random stream
        self.channels_last = False  # set by jfb_ip.lit.speed.apply_speed_switches

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.method.parameters())

    @property
    def calibrated(self) -> bool:
        """Whether the method is one whose weight is chosen on validation data (Wiener, TV, PnP-ADMM)."""
        return isinstance(self.method, CalibratedMethod)

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
            # Alg. 1 of Willingham et al. [4]: N problems per clean image, each degraded its own way, so the
            # batch-mean loss is the mean over the N problems; problem j of image i gets index i*N + j (distinct seeds
            # with fixed noise)
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
    def training_step(self, batch, batch_idx: int) -> dict[str, Any]:
        """One optimizer step on the loss of :meth:`training_loss`; none (no ``global_step``, no schedule step)
        when every sample of the batch diverged. Returns the loss and the solver statistics of the step
        (``fwd_stats``: every sample's forward solve; ``stats``: the trained reconstruction's, backward included),
        for :class:`~jfb_ip.lit.callbacks.TrainingStats`."""
        loss, fwd_stats, rec = self.training_outputs(batch)
        if loss is None:
            return {"fwd_stats": fwd_stats}
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return {"loss": loss.detach(), "fwd_stats": fwd_stats, "stats": None if rec is None else rec.solver_stats()}

    def training_loss(self, batch) -> Tensor | None:
        """The training loss over the samples whose solve stayed finite, or None when all diverged (on every
        process, under DDP)."""
        return self.training_outputs(batch)[0]

    def training_outputs(self, batch) -> tuple[Tensor | None, SolverStats | None, Reconstruction | None]:
        """(:meth:`training_loss`, the forward solves' stats of the whole batch, the reconstruction the loss was
        computed from: None when no sample survived on this process)."""
        x, meas, _ = batch
        self.calibrate_parts(meas, x)
        rec = self.method(meas)
        stats = rec.stats
        ok = torch.isfinite(rec.x.detach().flatten(1)).all(1)
        if stats is not None:
            ok &= ~stats.diverged
            self._log_stats("train", stats, x.shape[0], on_step=True)
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
            return None, stats, None  # no optimizer step: nothing finite to learn from
        self._skipped_in_a_row = 0
        if n_bad == x.shape[0]:  # only this process's samples all diverged: a zero loss keeps DDP's all-reduce in step
            # p * 0 per parameter: a fresh zero gradient each. `sum(p.sum()) * 0` hands every 0-d parameter a view of
            # one shared zero, which autograd stores as .grad without copying: DDP's copy-back from its bucket then
            # writes every scalar's averaged gradient into the same memory, and the last one wins on this process
            return sum((p * 0.0).sum() for p in self.method.parameters() if p.requires_grad), stats, None
        if n_bad:
            log.warning("step %d: skipped %d diverged/non-finite samples (total %d)", self.global_step, n_bad,
                        self.skipped_samples)
            # the bad samples' non-finite activations would turn the shared weight gradient into
            # NaN (0 * NaN) even when masked out of the loss: redo the step without them
            x, rec = x[ok], self.method(meas.subset(ok))
        loss = rec.loss(x, self.loss_fn, self.method.aux_loss)
        if rec.penalty is not None:  # the contraction penalty (included in the loss) and the Lip(T) it measured
            self.log("train/contraction_penalty", rec.penalty.detach(), on_step=True, batch_size=x.shape[0])
            self.log_dict({"train/solver/lipschitz_T_mean": rec.lipschitz.mean(),
                           "train/solver/lipschitz_T_max": rec.lipschitz.max()}, on_step=True, batch_size=x.shape[0])
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=x.shape[0])
        self.log("train/psnr", psnr_score(rec.x.detach(), x).mean(), on_step=True, prog_bar=True, batch_size=x.shape[0])
        return loss, stats, rec

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        if self.calibrated:
            self.method.calibrate_start()
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
        if self.calibrated:  # a method with nothing to train chooses its weight on validation data only
            self.method.calibrate_update(meas, x, psnr_score)
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
        if self.calibrated:
            calibrate_end(self.method)  # the lambda search scores every process's validation shard (DDP)
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
    def test_step(self, batch, batch_idx: int) -> dict[str, Any]:
        """The model's reconstruction of the seeded test measurements, for the test table
        (:class:`~jfb_ip.lit.callbacks.TestTable`): ``{"x": estimate, "stats": solver stats or None}``."""
        _, meas, _ = batch
        rec = self.method(meas)
        return {"x": rec.x, "stats": rec.stats}

    # ------------------------------------------------------------------ checkpoints
    # the run state beside the weights that Lightning does not keep: exact resume (docs/operations.md, "Faults, resume
    # and checkpoints")
    RUN_STATE_KEY = "jfb_ip_run_state"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[self.RUN_STATE_KEY] = {"skipped_samples": self.skipped_samples,
                                          "skipped_in_a_row": self._skipped_in_a_row,
                                          "train_batches": self._train_batches}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(self.RUN_STATE_KEY)
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        if state is not None and fitting:  # resuming a training run (evaluate.py only needs the weights)
            self.skipped_samples, self._skipped_in_a_row = state["skipped_samples"], state["skipped_in_a_row"]
            self._train_batches = state["train_batches"]
        schedule_from_config(self.scheduler_fn, checkpoint)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if self.optimizer_fn is None:
            raise ValueError("ReconstructionModule: no optimizer configured (module.optimizer)")
        opt = self.optimizer_fn(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_fn is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_fn(optimizer=opt), "interval": "step"}}
