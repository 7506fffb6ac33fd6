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

    ``data_step="prox"`` reaches the same equilibrium with another map. The fixed points of eq. (3.6),
    A^T(Ax - d) + lam (x - N(x)) = 0, are exactly those of

        T_prox(x) = (A^T A + lam I)^{-1} (A^T d + lam N(x))      (the data term's prox at N(x)),

    a half-quadratic-splitting step. Where A^T A has a null space (dropped pixels, the high frequencies
    SR removes, unsampled k-space) eq. (3.6) moves x by only eta lam (x - N(x)) per step, so its
    relative residual is small long before x is near the equilibrium, and JFB's one step carries the same
    factor; T_prox moves x to N(x) there (Lip(T_prox) <= Lip(N)), so the residual measures the distance
    and JFB's step is the network's own. Closed form for blur (circular), inpainting, SR and MRI;
    conjugate gradient for CT.

    Args:
        net: the network N (e.g. :class:`jfb_ip.nets.DnCNN`).
        eta: step size; None derives 1/(L + 1) per sample from L = lambda_max(A^T A).
        reg_weight: initial lam.
        data_step: ``"gradient"`` (eq. (3.6)) or ``"prox"`` (T_prox above; ``eta`` unused).
        learn_reg_weight: train lam with the network.
        log_lipschitz: measure the local Lipschitz constants of N and T on the first validation
            batch of every validation epoch (:meth:`FixedPointMethod.lipschitz_estimates`).
        solver, backward: equilibrium options (see :class:`FixedPointMethod`).
    """

    DATA_STEPS = ("gradient", "prox")

    def __init__(self, net: nn.Module, solver: Mapping[str, Any], backward: Mapping[str, Any],
                 eta: float | None = None, reg_weight: float = 0.05, learn_reg_weight: bool = True,
                 log_lipschitz: bool = True, data_step: str = "gradient"):
        super().__init__(solver, backward, log_lipschitz)
        if data_step not in self.DATA_STEPS:
            raise ValueError(f"DEGRAD: data_step must be one of {self.DATA_STEPS}, got {data_step!r}")
        if data_step == "prox" and eta is not None:
            raise ValueError("DEGRAD: data_step=prox takes no step size; drop method.eta (or use data_step=gradient)")
        if not 0 < reg_weight < 1:
            raise ValueError(f"DEGRAD: reg_weight must lie in (0, 1), got {reg_weight}")
        if eta is not None and eta <= 0:
            raise ValueError(f"DEGRAD: eta must be > 0 (or null for 1/(L+1)), got {eta}")
        self.net = net
        self.eta = eta
        self.data_step = data_step
        logit = torch.tensor(math.log(reg_weight / (1 - reg_weight)))
        self.reg_logit = nn.Parameter(logit, requires_grad=learn_reg_weight)

    @property
    def reg_weight(self) -> Tensor:
        return torch.sigmoid(self.reg_logit)

    def step_size(self, meas: Measurement, like: Tensor) -> Tensor | None:
        """eta per sample; None for ``data_step="prox"``, whose map takes no step (and needs no lambda_max(A^T A),
        a power iteration per batch)."""
        if self.data_step == "prox":
            return None
        if self.eta is not None:
            return per_sample(self.eta, like)
        return per_sample(1.0 / (meas.lambda_max() + 1.0), like)

    def regularizer(self, x: Tensor) -> Tensor:
        """S(x) = lam (x - N(x))."""
        return self.reg_weight * (x - self.net(x))

    def T(self, x: Tensor, meas: Measurement, eta: Tensor | None) -> Tensor:
        """One DE-GRAD step, eq. (3.6) of paper 000 (``data_step="prox"``: T_prox of the class docstring)."""
        if self.data_step == "prox":
            return meas.prox_data(self.net(x), self.reg_weight)
        return x - eta * (meas.grad(x) + self.regularizer(x))

    def forward(self, meas: Measurement) -> Reconstruction:
        z0 = meas.init()
        eta = self.step_size(meas, z0)
        with fixed_weights(self):
            x, stats = self.solve(lambda x: self.T(x, meas, eta), z0, module=self)
        return Reconstruction(x, stats=stats)
