"""The weight searches of :class:`~jfb_ip.methods.CalibratedMethod` modules (Wiener, TV, PnP-ADMM), run the same way
in one process and under DDP: each lambda's score summed over every process's batches, so all pick the same lambda."""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..methods import CalibratedMethod
from .distributed import sum_over_processes

log = logging.getLogger(__name__)


def image_metrics(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image PSNR and SSIM (data range 1) of the clamped reconstruction -> two (B,) tensors."""
    x_hat = x_hat.clamp(0, 1).to(x.dtype)
    psnr = peak_signal_noise_ratio(x_hat, x, data_range=1.0, dim=(1, 2, 3), reduction="none")
    ssim = structural_similarity_index_measure(x_hat, x, data_range=1.0, reduction="none")
    return psnr, ssim


def psnr_score(x_hat: Tensor, x: Tensor) -> Tensor:
    return image_metrics(x_hat, x)[0]


def calibrate_end(m: CalibratedMethod) -> None:
    """Keep the best lambda of the search, scored on every process's shard (DDP)."""
    m.calibrate_end(None if m.scores is None else sum_over_processes(m.scores))


class FirstBatchCalibration:
    """Tunes the calibrated parts inside a trained method (DEGRAD's ``initializer=wiener``) on its first training
    batch, once: the map it trains depends on them, so they are fixed before the first step (training data, never
    validation or test; the chosen lambda is a buffer, so a resumed run keeps it). The method itself, when it is a
    calibrated method, is not a part: it is tuned on validation data."""

    def __init__(self, method: nn.Module):
        self.method = method
        self._untuned: list[CalibratedMethod] | None = None  # looked for once: no module walk per step

    def __call__(self, meas, x: Tensor) -> None:
        if self._untuned is None:  # and no device read of `tuned` per step either
            self._untuned = [m for m in self.method.modules() if isinstance(m, CalibratedMethod)
                             and m is not self.method and not bool(m.tuned)]
        while self._untuned:
            m = self._untuned.pop()
            with torch.no_grad():
                m.calibrate_start()
                m.calibrate_update(meas, x, psnr_score)
                m.calibrate_end(sum_over_processes(m.scores))  # DDP: every process picks the same lambda
            log.info("%s: lambda %.3g tuned on the first training batch", type(m).__name__, float(m.lam))
