"""What every reconstruction method shares."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..physics import Measurement
from ..solvers import SolverStats, equilibrium
from ..solvers.equilibrium import check_names


class Method(nn.Module):
    """``forward(meas) -> (x_hat, stats)``.

    Methods with stages set ``n_stages`` and fill ``stage_outputs`` (x_1 .. x_K, the last
    being x_hat) at every forward: the module logs a PSNR per stage and, when ``aux_loss``
    is on, adds the MSE of every intermediate stage to the loss (paper 002 "Aux loss").
    """

    n_stages: int = 1
    aux_loss: bool = False
    stage_outputs: list[Tensor] | None = None

    def forward(self, meas: Measurement) -> tuple[Tensor, SolverStats | None]:  # pragma: no cover
        raise NotImplementedError


class Equilibrium:
    """The equilibrium options of a method, callable as ``solve(f, z0) -> (z, stats)``.

    Args:
        solver: forward solver options: ``forward`` (name), ``tol``, ``max_iter`` and the
            solver's own keys (Anderson: ``m``, ``lam``, ``beta``; Broyden: ``memory``; all: ``bound``).
        backward: the ``backward`` config group: ``mode`` plus that mode's options.
    """

    def __init__(self, solver: Mapping[str, Any], backward: Mapping[str, Any]):
        solver, backward = dict(solver), dict(backward)
        self.forward = solver.pop("forward", "anderson")
        self.mode = backward.pop("mode", "jfb")
        check_names(self.forward, self.mode, backward)  # fail when the config is built, not at the first step
        self.backward_tol = backward.pop("backward_tol", None)
        self.backward_max_iter = backward.pop("backward_max_iter", None)
        self.solver_options, self.backward_options = solver, backward

    def __call__(self, f, z0: Tensor) -> tuple[Tensor, SolverStats]:
        return equilibrium(f, z0, forward=self.forward, backward=self.mode, backward_tol=self.backward_tol,
                           backward_max_iter=self.backward_max_iter, backward_options=self.backward_options,
                           **self.solver_options)


class FixedPointMethod(Method):
    """A method whose output is the fixed point of a map T(x; meas) (see :class:`Equilibrium`)."""

    def __init__(self, solver: Mapping[str, Any], backward: Mapping[str, Any]):
        super().__init__()
        self.solve = Equilibrium(solver, backward)

    @property
    def backward_mode(self) -> str:
        return self.solve.mode


@contextmanager
def fixed_weights(module: nn.Module):
    """Evaluate parametrised weights (spectral norm) once and reuse them for every call inside.

    In training mode spectral normalisation runs a power-iteration step at every forward,
    so without this the map T would change at each solver iteration and the fixed point,
    the JFB step and the implicit gradient would belong to different maps. The weights are
    first evaluated with grad enabled (when it is) so the differentiable steps still reach
    the raw parameters.
    """
    with parametrize.cached():
        with torch.enable_grad() if torch.is_grad_enabled() else nullcontext():
            for m in module.modules():
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)
        yield


def per_sample(v: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or (B,) value shaped to broadcast over ``like`` (B, C, H, W)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v
