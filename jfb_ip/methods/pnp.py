"""Plug-and-play ADMM with a noise-conditioned denoiser as the prior's prox (Willingham et al. [4] §III-C)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..linalg import per_sample
from ..physics import Measurement
from .base import Reconstruction, refuse_fixed_point_options
from .calibrated import CalibratedMethod

TRAIN_HINT = "train one with `python train.py method=denoiser task=denoise`"


def default_pnp_lambda_grid() -> list[float]:
    return [0.23 * 2.0 ** (e / 2) for e in range(-4, 5)]  # DPIR's 0.23 times 1/4 .. 4 in half octaves


class PnPADMM(CalibratedMethod):
    """Plug-and-play ADMM (Chan et al. 2016, ref. [1] of Willingham et al. [4]) with a decreasing denoiser strength,
    the test-time algorithm of Willingham et al. [4] §III-C ("as described and used for testing in [8]").

    Willingham et al. [4] take the schedule's values (iterations, sigma_0, sigma_m) from their ref. [8] without stating
    the rho coupling; the coupling implemented here is DPIR's (Zhang et al. 2021, ref. [5] of Willingham et al. [4],
    ``get_rho_sigma``), the schedule of the Gaussian denoiser that Willingham et al. [4] pre-train from:

        sigma_k = sigma_max^(1 - t_k) * sigma_min^(t_k),  t_k = k / (n_iter - 1)   (log-spaced, k = 0 .. n_iter-1)
        rho_k   = lam * s^2 / sigma_k^2,  s = max(sigma_noise, noise_floor)         (per sample)

    and scaled ADMM (Boyd et al. 2011, §3.1.1) from x_0 = z_0 = meas.init(), u_0 = 0:

        x_{k+1} = argmin_x 1/2 ||A x - y||^2 + rho_k/2 ||x - (z_k - u_k)||^2   (``meas.prox_data``)
        z_{k+1} = D(x_{k+1} + u_k, sigma_k)                                     (the denoiser)
        u_{k+1} = (u_k + x_{k+1} - z_{k+1}) * rho_k / rho_{k+1}

    The rescaling of u keeps the unscaled multiplier rho u fixed when rho changes (Boyd et al. §3.4.1).
    The output is z_n (the last denoiser output, as DPIR returns). The data step is the operator's closed
    form (FFT for circular blur, pixel-wise for inpainting, Woodbury/FFT for SR, MRI) and conjugate
    gradient otherwise (CT, zero-padded blur). sigma_noise is the measurement's noise std (in y's units:
    the image's for every task but CT). ``sigma_min=None`` ends the schedule at sigma_noise (clamped to
    ``noise_floor``), DPIR's choice for deblurring (modelSigma2 = the noise level); sigma_min is capped by
    sigma_max. With the identity as "denoiser", z = x and u = 0, so the iteration is the proximal point
    method on 1/2||Ax - y||^2 and tends to the least-squares solution.

    ``lam`` (DPIR: 0.23) is chosen on the validation split from ``lambda_grid`` (:class:`CalibratedMethod`);
    an empty grid keeps it, which is how two priors are compared under identical hyper-parameters.

    Args:
        denoiser: a module ``D(x, sigma)`` (a trained one: :func:`jfb_ip.checkpoint.load_network`, which
            conf/method/pnp_admm.yaml calls with ``method.denoiser.path``); frozen (no gradients, nothing to train).
        n_iter: ADMM iterations (DPIR: 8 for deblurring).
        sigma_max: the first denoiser strength (DPIR: 49/255).
        sigma_min: the last one; None: the measurement's noise std per sample.
        lam: the data/prior balance of the rho schedule.
        lambda_grid: candidates for ``lam``; None: 0.23 x 2^(-2 .. 2) in half octaves.
        noise_floor: the smallest noise std used for s and sigma_min (DPIR: 0.255/255), so a noise-free
            task (inpainting without noise) still has rho > 0.
    """

    def __init__(self, denoiser: nn.Module, n_iter: int = 8, sigma_max: float = 49 / 255,
                 sigma_min: float | None = None, lam: float = 0.23, lambda_grid: Sequence[float] | None = None,
                 noise_floor: float = 0.255 / 255, solver: Mapping[str, Any] | None = None,
                 backward: Mapping[str, Any] | None = None):
        super().__init__("PnPADMM", lam, default_pnp_lambda_grid() if lambda_grid is None else lambda_grid)
        refuse_fixed_point_options("pnp_admm", solver, backward, "none", "runs a set number of ADMM iterations "
                                   "with a pre-trained denoiser and has nothing to train")
        if int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"PnPADMM: n_iter must be an integer >= 1, got {n_iter!r}")
        if not noise_floor > 0:
            raise ValueError(f"PnPADMM: noise_floor must be > 0, got {noise_floor!r}")
        if not sigma_max > 0 or (sigma_min is not None and not 0 < sigma_min <= sigma_max):
            raise ValueError(f"PnPADMM: need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min!r}, "
                             f"sigma_max={sigma_max!r}")
        if denoiser is None:
            raise ValueError(f"PnPADMM: method.denoiser is not set; {TRAIN_HINT} and pass its "
                             f"checkpoint: method.denoiser.path=<run dir>/checkpoints/last.ckpt")
        if not isinstance(denoiser, nn.Module):
            raise ValueError(f"PnPADMM: denoiser must be an nn.Module D(x, sigma), got {type(denoiser).__name__} (a "
                             f"checkpoint is read by jfb_ip.checkpoint.load_network: method.denoiser.path=<ckpt>)")
        self.denoiser = denoiser.requires_grad_(False)
        self.n_iter, self.sigma_max, self.noise_floor = int(n_iter), float(sigma_max), float(noise_floor)
        self.sigma_min = None if sigma_min is None else float(sigma_min)

    def schedule(self, meas: Measurement, lam) -> tuple[Tensor, Tensor]:
        """(sigmas, rhos), each (n_iter, B): the denoiser strengths and the ADMM penalties per iteration."""
        noise = meas.sigma
        s = noise.clamp_min(self.noise_floor)
        last = s if self.sigma_min is None else torch.full_like(s, self.sigma_min)
        last = last.clamp(max=self.sigma_max)
        t = torch.linspace(0, 1, self.n_iter, dtype=noise.dtype, device=noise.device)[:, None]
        sigmas = torch.exp((1 - t) * math.log(self.sigma_max) + t * last.log()[None])
        rhos = per_sample(lam, s) * s[None] ** 2 / sigmas ** 2
        return sigmas, rhos

    def reconstruct(self, meas: Measurement, lam) -> Reconstruction:
        sigmas, rhos = self.schedule(meas, lam)
        z = meas.init()
        channels = getattr(self.denoiser, "channels", z.shape[1])
        if channels != z.shape[1]:
            raise ValueError(f"PnPADMM: method.denoiser takes {channels}-channel images but this task's have "
                             f"{z.shape[1]}: give a denoiser trained with data.channels={z.shape[1]}")
        u = torch.zeros_like(z)
        for k in range(self.n_iter):
            x = meas.prox_data(z - u, rhos[k])
            z = self.denoiser(x + u, sigmas[k])
            if k + 1 < self.n_iter:
                u = (u + x - z) * per_sample(rhos[k] / rhos[k + 1], u)
        return Reconstruction(z)
