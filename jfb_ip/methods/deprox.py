"""DE-Prox: the deep-equilibrium proximal-gradient map (Liu et al. [2] §3.3 ii)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..physics import Measurement
from ..linalg import per_sample
from .base import FixedPointMethod, Reconstruction


class DEProx(FixedPointMethod):
    """Fixed point of T(x) = S(x - eta A^T(Ax - d)) with S a learned denoiser.

    I - eta A^T A is non-expansive for eta <= 1/L, so Lip(T) <= Lip(S): T is a contraction
    whenever S is. With ``residual=False`` and the true operator-norm normalisation of every
    conv (``norm_mode="operator"``) Lip(S) <= gamma^depth < 1 is guaranteed; the kernel-matrix
    spectral norm gives no bound (see :class:`jfb_ip.nets.DnCNN`). The denoiser form
    S(x) = x - R(x) (``residual=True``) has Lip(S) <= 1 + Lip(R) and was measured non-contractive
    (local Lipschitz 1.01 at initialisation; no solve reached tol 1e-3 in 50 Anderson iterations),
    so the default config uses ``residual=False`` (every solve converged in 3 iterations at
    initialisation, 8 natural 48x48 crops).

    S = N must learn a denoiser's identity part from scratch, which trains badly. The averaged form
    (``averaged=alpha``) keeps a skip and stays contractive: S(y) = (1 - alpha) y + alpha N(y) with
    alpha in (0, 1) learned, so Lip(S) <= 1 - alpha (1 - Lip(N)) < 1 whenever Lip(N) < 1 (guaranteed
    with ``norm_mode="operator"``), and S starts near the identity for small alpha (an averaged
    operator; the relaxation of the Krasnosel'skii-Mann iteration).

    Args:
        net: the network N (S itself when ``averaged`` is None).
        eta: step size; None derives 1/L per sample.
        averaged: None (S = N), or the initial alpha of the averaged form.
        learn_averaged: train alpha with the network.
        log_lipschitz: measure Lip(N) and Lip(T) at the fixed points at each validation.
        contraction_penalty, contraction_target, contraction_iters: the training-time penalty on Lip(T) above the
            target at the fixed points (:meth:`FixedPointMethod.contraction_term`; 0: off).
    """

    def __init__(self, net: nn.Module, solver: Mapping[str, Any], backward: Mapping[str, Any],
                 eta: float | None = None, averaged: float | None = None, learn_averaged: bool = True,
                 log_lipschitz: bool = True, contraction_penalty: float = 0.0, contraction_target: float = 0.9,
                 contraction_iters: int = 4):
        super().__init__(solver, backward, log_lipschitz, contraction_penalty, contraction_target, contraction_iters)
        if eta is not None and eta <= 0:
            raise ValueError(f"DEProx: eta must be > 0 (or null for 1/L), got {eta}")
        if averaged is not None and not 0 < averaged < 1:
            raise ValueError(f"DEProx: averaged must lie in (0, 1) (or null for S = N), got {averaged}")
        self.net, self.eta = net, eta
        self.alpha_logit = None if averaged is None else nn.Parameter(
            torch.tensor(math.log(averaged / (1 - averaged))), requires_grad=learn_averaged)

    @property
    def alpha(self) -> Tensor | None:
        return None if self.alpha_logit is None else torch.sigmoid(self.alpha_logit)

    def denoise(self, y: Tensor) -> Tensor:
        """S(y): N(y), or (1 - alpha) y + alpha N(y) in the averaged form."""
        if self.alpha_logit is None:
            return self.net(y)
        alpha = self.alpha
        return (1 - alpha) * y + alpha * self.net(y)

    def step_size(self, meas: Measurement, like: Tensor) -> Tensor:
        return per_sample(self.eta if self.eta is not None else 1.0 / meas.lambda_max(), like)

    def T(self, x: Tensor, meas: Measurement, eta: Tensor) -> Tensor:
        return self.denoise(x - eta * meas.grad(x))

    def forward(self, meas: Measurement) -> Reconstruction:
        z0 = meas.init()
        eta = self.step_size(meas, z0)
        return self.solve_map(self.bound_map(meas, eta), z0, module=self)
