"""Gaussian denoising: A = I, the task a plug-and-play prior is trained on (Willingham et al. [4] §III-B: the
prior is "pre-trained as a Gaussian denoiser"; DRUNet, their ref. [5], draws the noise level per
sample over a range)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import per_sample
from .measurement import Measurement
from .noise import gaussian_noise
from .operator import LinearOperator
from .tasks import Task, operator_generators, value_or_range


class Identity(LinearOperator):
    """A x = x. Its adjoint, norm (1), Fourier multiplier (1) and data prox are exact."""

    def A(self, x: Tensor) -> Tensor:
        return x

    def A_adjoint(self, y: Tensor) -> Tensor:
        return y

    def init(self, y: Tensor) -> Tensor:
        return y

    def _power_iteration(self, shape, dtype, device, n_iter: int) -> Tensor:
        return torch.ones(shape[0], dtype=dtype, device=device)

    def fourier_multiplier(self, shape: tuple[int, int], dtype, device) -> Tensor:
        """The identity is the circular convolution with a unit impulse: multiplier 1 everywhere."""
        H, W = shape
        return torch.ones(1, 1, H, W // 2 + 1, dtype=dtype, device=device)

    def prox_is_closed_form(self) -> bool:
        return True

    def prox_data(self, v: Tensor, rho, y: Tensor, n_iter: int = 100, tol: float = 1e-6) -> Tensor:
        """argmin_x 1/2||x - y||^2 + rho/2||x - v||^2 = (y + rho v) / (1 + rho)."""
        rho_b = per_sample(rho, v)
        return (y + rho_b * v) / (1 + rho_b)


class Denoise(Task):
    """y = x + sigma n with sigma drawn per sample, uniformly in ``noise_std`` = [min, max] (or fixed).

    The noise level of every sample is its measurement's ``sigma``, which a noise-conditioned
    denoiser takes as its noise-level map. Training draws come from the batch generator; validation
    and test draws from each sample's seed (a stream apart from its noise), like every task's
    operator parameters, so a sample's level repeats whatever its batch.

    Args:
        noise_std: a float, or a [min, max] range in [0, 1] (DRUNet trains on [0, 50/255]).
        channels: expected image channels (None: any).
    """

    name = "denoise"

    def __init__(self, noise_std=(0.0, 0.2), channels: int | None = 3):
        self.noise_range = value_or_range("Denoise: noise_std", noise_std, 0.0, 1.0)
        self.channels = channels

    def operator(self, x: Tensor, generator=None, seeds=None) -> Identity:
        return Identity()

    def noise_levels(self, x: Tensor, generator=None, seeds: Tensor | None = None) -> Tensor:
        """(B,) noise stds drawn uniformly in the range."""
        lo, hi = self.noise_range
        if seeds is None:
            u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        else:
            u = torch.cat([torch.rand(1, generator=g, device=x.device, dtype=x.dtype)
                           for g in operator_generators(seeds, x.device)])
        return lo + (hi - lo) * u

    def sample(self, x: Tensor, generator: torch.Generator | None = None, seeds: Tensor | None = None) -> Measurement:
        self.check_input(x)
        sigma = self.noise_levels(x, generator, seeds)
        return Measurement(y=gaussian_noise(x, sigma, generator, seeds), physics=self.operator(x), sigma=sigma,
                           x_shape=x.shape)
