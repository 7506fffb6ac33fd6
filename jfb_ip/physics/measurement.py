"""A measurement y = A x + n together with its operator and noise level."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from .operator import LinearOperator


@dataclass
class Measurement:
    """What a method sees: ``y``, the operator that made it and the noise std per sample.

    Methods only call :meth:`grad`, :meth:`init`, :meth:`prox_data`, :meth:`A`,
    :meth:`A_adjoint` and :meth:`lambda_max`, so a mixed multi-task batch can later be a list
    of sub-batch measurements behind the same methods.
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
        """Gradient of the data term 1/2||Ax - y||^2: A^T(Ax - y) (the data part of eq. (3.5), Liu et al. [1])."""
        return self.physics.A_adjoint(self.physics.A(x) - self.y)

    def init(self) -> Tensor:
        return self.physics.init(self.y)

    def lambda_max(self) -> Tensor:
        """L = lambda_max(A^T A) = ||A||^2 per sample, shape (B,)."""
        return self.physics.lambda_max(self.x_shape, self.y.dtype, self.y.device)

    def prox_data(self, v: Tensor, rho) -> Tensor:
        return self.physics.prox_data(v, rho, self.y)

    def subset(self, keep: Tensor) -> "Measurement":
        """The measurement of the samples where the boolean mask ``keep`` (B,) is True: per-sample
        operator parameters (tensors whose first dimension is the batch) are indexed, shared ones kept."""
        B = self.batch_size
        physics = copy.copy(self.physics)
        physics.__dict__.pop("_lambda_max_cache", None)
        for k, v in list(vars(physics).items()):
            if torch.is_tensor(v) and v.dim() and v.shape[0] == B and B > 1:
                setattr(physics, k, v[keep])
        n = int(keep.sum())
        return Measurement(y=self.y[keep], physics=physics, sigma=self.sigma[keep],
                           x_shape=torch.Size((n, *self.x_shape[1:])))

    def as_image(self) -> Tensor:
        """The measurement shown/scored as an image: y itself when it has the image's shape."""
        return self.y if self.y.shape == self.x_shape else self.init()

    @property
    def batch_size(self) -> int:
        return self.y.shape[0]
