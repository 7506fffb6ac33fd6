"""MTDEQ: the multi-task deep-equilibrium prior of Willingham et al. [4] (Alg. 1, eq. (3), §III)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..physics import Measurement
from ..linalg import per_sample
from .base import FixedPointMethod, Reconstruction
from ..checkpoint import load_network


def load_net_weights(net: nn.Module, path: str | Path) -> None:
    """Copy the ``method.net`` of a train.py checkpoint (``method=denoiser``, or ``mtdeq``) into ``net``, in place
    (the optimizer keeps the same parameters). Read and checked by :func:`jfb_ip.checkpoint.load_network`; a
    network of another architecture is one ValueError naming the fix."""
    try:
        source = load_network(path, noise_conditioned=True)
    except ValueError as e:
        raise ValueError(f"method.init_from={path}: {e}") from None
    try:
        net.load_state_dict(source.state_dict())
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ValueError(f"method.init_from={path}: its network differs from method.net ({detail[:200]}); set "
                         f"method.net.* to the values of the run that wrote it") from None


class MTDEQ(FixedPointMethod):
    """Fixed point of the forward-backward map of eq. (3) of Willingham et al. [4]:

        f(z) = Q_theta(z - eta A^T(Az - y), sigma_denoise),   sigma_denoise = eta * sigma_noise,

    with Q_theta a noise-conditioned network (``net(x, sigma)``, sigma per sample; a DRUNet-style UNet in
    the paper, "pre-trained as a Gaussian denoiser") and sigma_noise the measurement's noise std. §III-B:
    "The noise-standard-deviation given as input in each regularization step of the FB algorithm is
    sigma_denoise = eta sigma_noise". §III-A: eta = 0.49. Trained with the loss of f at the fixed point,
    averaged over the N problems of each clean image (Alg. 1, eq. (4); ``task.problems_per_image``), by
    Jacobian-free backprop by default (any ``backward=`` mode composes).

    Stopping (§III-B): "converged after the MSE of the difference between iterates is less than 1e-7 ...
    capped at 350 ... terminate if any coordinate ... larger than 1e10". The solvers stop on the relative
    residual r = ||f(z) - z|| / ||f(z)|| (one definition for every method), and
    MSE = r^2 mean(f(z)^2), so MSE < 1e-7 is r < sqrt(1e-7 / mean(f(z)^2)): 6.3e-4 for an image of mean
    square 0.25. conf/method/mtdeq.yaml sets solver.tol = 6e-4, max_iter = 350 and bound = 1e10 (the
    divergence guard). The mapping is exact only on average: the embedded crops' mean square is 0.22 (train)
    and 0.30 (test) on average but 0.04 to 0.50 between the 10th and 90th percentile, where r < 6e-4 means
    MSE < 1.4e-8 (dark crops: stricter than the paper) to MSE < 1.8e-7 (bright ones: looser). A sample
    stopped by the cap is reported as not converged.

    Args:
        net: Q_theta, called as ``net(x, sigma)`` with sigma (B,).
        eta: the step size (Willingham et al. [4]: 0.49).
        init_from: a train.py checkpoint whose ``method.net`` has this architecture (``method=denoiser``); its
            weights are copied in before the first forward pass (not at construction, so a trained MTDEQ
            checkpoint rebuilds even where that file is gone: its own weights replace them anyway).
        log_lipschitz: log Lip(Q) and Lip(f) at the fixed points at each validation.
        contraction_penalty, contraction_target, contraction_iters: the training-time penalty on Lip(f) above the
            target at the fixed points (:meth:`FixedPointMethod.contraction_term`; 0: off).
        solver, backward: equilibrium options (see :class:`FixedPointMethod`).
    """

    def __init__(self, net: nn.Module, solver: Mapping[str, Any], backward: Mapping[str, Any], eta: float = 0.49,
                 init_from: str | None = None, log_lipschitz: bool = False, contraction_penalty: float = 0.0,
                 contraction_target: float = 0.9, contraction_iters: int = 4):
        super().__init__(solver, backward, log_lipschitz, contraction_penalty, contraction_target, contraction_iters)
        if not eta > 0:
            raise ValueError(f"MTDEQ: eta must be > 0 (Willingham et al. [4]: 0.49), got {eta!r}")
        self.net, self.eta = net, float(eta)
        self.init_from = None if init_from in (None, "") else str(init_from)
        # True once init_from's weights are in (or when there is nothing to load); saved in checkpoints,
        # so a trained model's weights are never overwritten by the initialisation
        self.register_buffer("initialised", torch.tensor(self.init_from is None))

    def step_size(self, meas: Measurement, like: Tensor) -> Tensor:
        return per_sample(self.eta, like)

    def denoise_sigma(self, meas: Measurement) -> Tensor:
        """sigma_denoise = eta * sigma_noise per sample (§III-B of Willingham et al. [4])."""
        return self.eta * meas.sigma

    def network_map(self, meas: Measurement) -> Callable[[Tensor], Tensor]:
        sigma = self.denoise_sigma(meas)
        return lambda x: self.net(x, sigma)

    def T(self, z: Tensor, meas: Measurement, eta: Tensor) -> Tensor:
        """f_{i,theta}(z) of eq. (3) of Willingham et al. [4]."""
        return self.net(z - eta * meas.grad(z), self.denoise_sigma(meas))

    def _initialise(self) -> None:
        if self.init_from is not None and not bool(self.initialised):
            load_net_weights(self.net, self.init_from)
            self.initialised.fill_(True)

    def forward(self, meas: Measurement) -> Reconstruction:
        self._initialise()
        z0 = meas.init()  # Willingham et al. [4]: z_i = P(y_i) (y for blur/completion, bilinear resizing for SR)
        eta = self.step_size(meas, z0)
        return self.solve_map(self.bound_map(meas, eta), z0, module=self.net)
