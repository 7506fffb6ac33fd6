"""Tasks: how a clean batch becomes a measurement (operator family, its parameters, noise)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .blur import GaussianBlur
from .measurement import Measurement
from .noise import gaussian_noise


class Task:
    """Base: ``sample(x, generator, seeds) -> Measurement`` on x's device."""

    name = "task"
    channels: int | None = None

    def operator(self, x: Tensor, generator=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if self.channels is not None and x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__}: images have {x.shape[1]} channels but the task is set up "
                             f"for {self.channels}; set data.channels={self.channels} or task.channels={x.shape[1]}")

    def sample(self, x: Tensor, generator: torch.Generator | None = None, seeds: Tensor | None = None) -> Measurement:
        self.check_input(x)
        physics = self.operator(x, generator)
        sigma = torch.full((x.shape[0],), float(self.noise_std), device=x.device, dtype=x.dtype)
        y = gaussian_noise(physics.A(x), sigma, generator, seeds)
        return Measurement(y=y, physics=physics, sigma=sigma, x_shape=x.shape)


class Deblur(Task):
    """Gaussian blur + white Gaussian noise (paper 000 §5.1-5.2, paper 002 §4).

    Args:
        kernel_size: odd side of the kernel.
        variance: variance of the Gaussian, i.e. its standard deviation is sqrt(variance).
        noise_std: standard deviation of the additive noise (images in [0, 1]).
        padding: boundary of the convolution, 'circular' or 'zeros'.
        channels: expected image channels (None: any).
    """

    name = "deblur"

    def __init__(self, kernel_size: int = 9, variance: float = 5.0, noise_std: float = 0.01,
                 padding: str = "circular", channels: int | None = 3):
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"Deblur: kernel_size must be a positive odd integer, got {kernel_size}")
        if variance <= 0:
            raise ValueError(f"Deblur: variance must be > 0, got {variance}")
        self.kernel_size, self.std, self.noise_std = kernel_size, math.sqrt(variance), noise_std
        self.padding, self.channels = padding, channels

    def operator(self, x: Tensor, generator=None) -> GaussianBlur:
        # one fixed kernel: reuse the operator so its cached norm() survives across batches
        key = (x.device, x.dtype)
        if getattr(self, "_op_key", None) != key:
            self._op = GaussianBlur.from_std(self.kernel_size, self.std, self.padding, device=x.device, dtype=x.dtype)
            self._op_key = key
        return self._op
