"""What every reconstruction method shares."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..physics import Measurement
from ..solvers import BACKWARD_MODES, FORWARD_SOLVERS, SolverStats, equilibrium


class Method(nn.Module):
    """``forward(meas) -> (x_hat, stats)``; ``aux_outputs`` holds per-stage outputs when a
    method has stages (used for per-stage metrics and auxiliary losses)."""

    aux_outputs: list[Tensor] | None = None

    def forward(self, meas: Measurement) -> tuple[Tensor, SolverStats | None]:  # pragma: no cover
        raise NotImplementedError


class FixedPointMethod(Method):
    """A method whose output is the fixed point of a map T(x; meas).

    Args:
        solver: forward solver options: ``forward`` (name), ``tol``, ``max_iter`` and the
            solver's own keys (Anderson: ``m``, ``lam``, ``beta``; all: ``bound``).
        backward: the ``backward`` config group: ``mode`` plus that mode's options.
    """

    def __init__(self, solver: Mapping[str, Any], backward: Mapping[str, Any]):
        super().__init__()
        solver, backward = dict(solver), dict(backward)
        if solver.get("forward", "anderson") not in FORWARD_SOLVERS:
            raise ValueError(f"unknown forward solver {solver.get('forward')!r}; choose from {sorted(FORWARD_SOLVERS)}")
        mode = backward.pop("mode", "jfb")
        if mode not in BACKWARD_MODES:
            raise ValueError(f"unknown backward mode {mode!r}; choose from {sorted(BACKWARD_MODES)}")
        self.backward_mode = mode
        self.solver_options = solver
        self.backward_options = backward

    def solve(self, f, z0: Tensor) -> tuple[Tensor, SolverStats]:
        opts = dict(self.solver_options)
        bw = dict(self.backward_options)
        return equilibrium(f, z0, forward=opts.pop("forward", "anderson"), backward=self.backward_mode,
                           backward_tol=bw.pop("backward_tol", None), backward_max_iter=bw.pop("backward_max_iter", None),
                           backward_options=bw, **opts)


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
