"""Classical references with no training."""
from __future__ import annotations

from typing import Sequence

import torch

from ..physics import Measurement
from .base import Method


class Wiener(Method):
    """Direct regularised inverse argmin ||Ax - y||^2 + lam ||Px||^2 (eq. (3.1)-style direct
    inverse of paper 000 made stable): P = finite differences gives the Wiener filter for a
    1/|w|^2 image spectrum, P = I plain Tikhonov. Closed form by FFT for circular blur."""

    def __init__(self, lam: float = 1e-2, prior: str = "gradient"):
        super().__init__()
        self.prior = prior
        self.register_buffer("lam", torch.tensor(float(lam)))

    def forward(self, meas: Measurement):
        return meas.tikhonov(self.lam.to(meas.y.dtype), self.prior), None


def default_lambda_grid() -> Sequence[float]:
    return [10 ** (e / 4) for e in range(-20, 1)]  # 1e-5 ... 1
