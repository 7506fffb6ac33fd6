"""Classical references with nothing to train, evaluated by the same path as every method."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..physics import Measurement, MixedMeasurement, laplacian
from ..linalg import conjugate_gradient, per_sample
from .base import Reconstruction, refuse_fixed_point_options
from .calibrated import CalibratedMethod

PRIORS = ("identity", "gradient")


def default_lambda_grid() -> list[float]:
    return [10 ** (e / 4) for e in range(-20, 1)]  # 1e-5 ... 1


def tikhonov(meas: Measurement, lam: Tensor | float, prior: str = "gradient", n_iter: int = 200,
             tol: float = 1e-6) -> Tensor:
    """argmin_x ||Ax - y||^2 + lam ||Px||^2 with P = I ('identity') or forward differences
    ('gradient'): the direct inverse of Liu et al. [1] made stable. With the gradient prior it is the
    Wiener filter for a 1/|w|^2 image spectrum. Exact by FFT when A is a circular convolution
    (its ``fourier_multiplier``), conjugate gradient on the normal equations otherwise."""
    if prior not in PRIORS:
        raise ValueError(f"tikhonov: prior must be one of {PRIORS}, got {prior!r}")
    if isinstance(meas, MixedMeasurement):  # a multi-task batch: each sub-batch its own inverse
        return meas.per_part(lambda m, lam_k: tikhonov(m, lam_k, prior, n_iter, tol), lam)
    y, physics = meas.y, meas.physics
    K = physics.fourier_multiplier(meas.x_shape[-2:], y.dtype, y.device) if y.shape == meas.x_shape else None
    if K is not None:
        H, W = meas.x_shape[-2:]
        if prior == "identity":
            P2 = torch.ones(1, dtype=y.dtype, device=y.device)
        else:  # |FFT of the forward-difference stencil|^2, circular like A
            wy = 2 * math.pi * torch.fft.fftfreq(H, dtype=y.dtype, device=y.device)[:, None]
            wx = 2 * math.pi * torch.fft.rfftfreq(W, dtype=y.dtype, device=y.device)[None, :]
            P2 = 4 - 2 * torch.cos(wy) - 2 * torch.cos(wx)
        num = K.conj() * torch.fft.rfft2(y)
        return torch.fft.irfft2(num / (K.abs() ** 2 + per_sample(lam, y) * P2), s=(H, W))
    x0 = meas.init()
    lam_b = per_sample(lam, x0)
    reg = (lambda x: x) if prior == "identity" else (lambda x: laplacian(x, "replicate"))
    return conjugate_gradient(lambda x: physics.AtA(x) + lam_b * reg(x), meas.A_adjoint(y), x0, n_iter, tol)


class Wiener(CalibratedMethod):
    """The Tikhonov/Wiener inverse (:func:`tikhonov`) as a method (``method=wiener``).

    ``lam`` is relative to ||A||^2 = lambda_max(A^T A): :func:`tikhonov` gets ``lam * ||A||^2``
    per sample, so one grid suits every operator (||A||^2 is 1 for a normalised blur, inpainting
    and MRI, 1/f^2 for f-fold downsampling, hundreds for CT sinograms).

    ``lam`` is tuned on validation data by :class:`CalibratedMethod`'s grid search (buffers ``lam`` and
    ``tuned`` travel in the checkpoint); never tuned on test data.

    Args:
        lam: the weight used until (or instead of, with an empty grid) tuning.
        prior: 'gradient' (Wiener, default) or 'identity' (plain Tikhonov).
        lambda_grid: candidate weights; None gives 1e-5 .. 1 in quarter decades.
    """

    def __init__(self, lam: float = 1e-2, prior: str = "gradient", lambda_grid: Sequence[float] | None = None,
                 solver: Mapping[str, Any] | None = None, backward: Mapping[str, Any] | None = None):
        super().__init__("Wiener", lam, default_lambda_grid() if lambda_grid is None else lambda_grid)
        refuse_fixed_point_options("wiener", solver, backward, "none", "is a closed-form inverse with nothing to train")
        if prior not in PRIORS:
            raise ValueError(f"Wiener: prior must be one of {PRIORS}, got {prior!r}")
        self.prior = prior

    def reconstruct(self, meas: Measurement, lam) -> Reconstruction:
        return Reconstruction(self.solve(meas, lam))

    def solve(self, meas: Measurement, lam) -> Tensor:
        """:func:`tikhonov` with the weight ``lam`` relative to ||A||^2 (per sample)."""
        return tikhonov(meas, lam * meas.lambda_max(), self.prior)
