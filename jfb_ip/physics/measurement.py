"""A measurement y = A x + n together with its operator and noise level."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .operator import LinearOperator


@dataclass
class Measurement:
    """What a method sees: ``y``, the operator that made it and the noise std per sample.

    Methods only call :meth:`grad`, :meth:`init`, :meth:`prox_data`, :meth:`A`,
    :meth:`A_adjoint` and :meth:`norm`, so a mixed multi-task batch can later be a list of
    sub-batch measurements behind the same methods.
    """

    y: Tensor
    physics: LinearOperator
    sigma: Tensor
    x_shape: torch.Size

    def A(self, x: Tensor) -> Tensor:
        return self.physics.A(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.physics.A_adjoint(y)

    def grad(self, x: Tensor) -> Tensor:
        """Gradient of the data term 1/2||Ax - y||^2: A^T(Ax - y) (the data part of eq. (3.5), paper 000)."""
        return self.physics.A_adjoint(self.physics.A(x) - self.y)

    def init(self) -> Tensor:
        return self.physics.init(self.y)

    def norm(self) -> Tensor:
        """L = lambda_max(A^T A) per sample, shape (B,)."""
        return self.physics.norm(torch.empty(self.x_shape, dtype=self.y.dtype, device=self.y.device))

    def prox_data(self, v: Tensor, rho) -> Tensor:
        return self.physics.prox_data(v, rho, self.y)

    def tikhonov(self, lam, prior: str = "gradient") -> Tensor:
        return self.physics.tikhonov(self.y, lam, prior)

    def as_image(self) -> Tensor:
        """The measurement shown/scored as an image: y itself when it has the image's shape."""
        return self.y if self.y.shape == self.x_shape else self.init()

    @property
    def batch_size(self) -> int:
        return self.y.shape[0]
