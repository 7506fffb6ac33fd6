"""DE-GRAD: the deep-equilibrium gradient-descent map of papers 000/001."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..physics import Measurement
from ..solvers import per_sample
from .base import FixedPointMethod, Reconstruction, fixed_weights


class DEGRAD(FixedPointMethod):
    """Fixed point of T(x) = x - eta * (A^T(Ax - d) + S(x)), eq. (3.5)-(3.6) of paper 000.

    The learned term is S(x) = lam * (x - N(x)) with N the network (a denoiser-like map with
    a Lipschitz constant eps < 1 when spectral normalisation is on) and lam in (0, 1) a
    learned weight. Then S - lam*I is lam*eps-Lipschitz and, for eta <= 1/(L + 1),
    Theorem 3.1 of paper 000 (with the data term scaled by 1/lam) gives the contraction
    factor gamma = 1 - eta * lam * (1 - eps) < 1, whatever the blur's smallest eigenvalue.
    At lam -> 0 the fixed point is the least-squares solution; N(x) = 0 gives Tikhonov.

    Args:
        net: the network N (e.g. :class:`jfb_ip.nets.DnCNN`).
        eta: step size; None derives 1/(L + 1) per sample from L = lambda_max(A^T A).
        reg_weight: initial lam.
        learn_reg_weight: train lam with the network.
        log_lipschitz: measure the local Lipschitz constants of N and T on the first validation
            batch of every validation epoch (:meth:`FixedPointMethod.lipschitz_estimates`).
        solver, backward: equilibrium options (see :class:`FixedPointMethod`).
    """

    def __init__(self, net: nn.Module, solver: Mapping[str, Any], backward: Mapping[str, Any],
                 eta: float | None = None, reg_weight: float = 0.05, learn_reg_weight: bool = True,
                 log_lipschitz: bool = True):
        super().__init__(solver, backward, log_lipschitz)
        if not 0 < reg_weight < 1:
            raise ValueError(f"DEGRAD: reg_weight must lie in (0, 1), got {reg_weight}")
        if eta is not None and eta <= 0:
            raise ValueError(f"DEGRAD: eta must be > 0 (or null for 1/(L+1)), got {eta}")
        self.net = net
        self.eta = eta
        logit = torch.tensor(math.log(reg_weight / (1 - reg_weight)))
        self.reg_logit = nn.Parameter(logit, requires_grad=learn_reg_weight)

    @property
    def reg_weight(self) -> Tensor:
        return torch.sigmoid(self.reg_logit)

    def step_size(self, meas: Measurement, like: Tensor) -> Tensor:
        if self.eta is not None:
            return per_sample(self.eta, like)
        return per_sample(1.0 / (meas.lambda_max() + 1.0), like)

    def regularizer(self, x: Tensor) -> Tensor:
        """S(x) = lam (x - N(x))."""
        return self.reg_weight * (x - self.net(x))

    def T(self, x: Tensor, meas: Measurement, eta: Tensor) -> Tensor:
        """One DE-GRAD step, eq. (3.6) of paper 000."""
        return x - eta * (meas.grad(x) + self.regularizer(x))

    def forward(self, meas: Measurement) -> Reconstruction:
        z0 = meas.init()
        eta = self.step_size(meas, z0)
        with fixed_weights(self):
            x, stats = self.solve(lambda x: self.T(x, meas, eta), z0, module=self)
        return Reconstruction(x, stats=stats)
