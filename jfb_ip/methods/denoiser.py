"""A noise-conditioned Gaussian denoiser as a method (``method=denoiser``): the prior of the
PnP-ADMM of Willingham et al. [4] ("pre-trained as a Gaussian denoiser", §III-B) and the initialisation of MTDEQ."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..physics import Measurement
from .base import Method, Reconstruction, refuse_fixed_point_options


class Denoiser(Method):
    """x_hat = net(meas.init(), meas.sigma): one pass of a noise-conditioned network.

    With ``task=denoise`` (A = I, a noise level drawn per sample over a range) ``meas.init()`` is the
    noisy image and ``meas.sigma`` its noise std, so training with the MSE loss is DRUNet's training
    of a Gaussian denoiser (ref. [5] of Willingham et al. [4]). On another task it is a learned post-processing of
    the task's initial guess, conditioned on the measurement noise (no physics inside).

    Contract for priors (:func:`jfb_ip.checkpoint.load_network`): the network is the ``net``
    attribute and is called as ``net(x, sigma)`` with sigma (B,).

    Args:
        net: a noise-conditioned network ``net(x, sigma) -> x`` (:class:`~jfb_ip.nets.NoiseConditionedUNet`).
        solver, backward: must be the ``none`` groups (one pass, no fixed point; refused otherwise).
    """

    def __init__(self, net: nn.Module, solver: Mapping[str, Any] | None = None,
                 backward: Mapping[str, Any] | None = None):
        super().__init__()
        refuse_fixed_point_options("denoiser", solver, backward, "none", "is one network pass with no fixed point")
        self.net = net

    def forward(self, meas: Measurement) -> Reconstruction:
        return Reconstruction(self.net(meas.init(), meas.sigma))
