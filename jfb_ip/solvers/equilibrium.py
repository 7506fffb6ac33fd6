"""The one entry point: ``z, stats = equilibrium(f, z0, forward=..., backward=...)``."""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import Tensor

from .backward import BACKWARD_MODES, mode_options
from .forward import FORWARD_SOLVERS
from .stats import SolverStats


def check_names(forward: str, backward: str, backward_options=None) -> None:
    """Raise a clear ValueError for an unknown forward solver, backward mode, or an option
    the backward mode does not take (options are never silently ignored)."""
    if forward not in FORWARD_SOLVERS:
        raise ValueError(f"unknown forward solver {forward!r}; choose from {sorted(FORWARD_SOLVERS)}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"unknown backward mode {backward!r}; choose from {sorted(BACKWARD_MODES)}")
    unknown = set(backward_options or {}) - mode_options(backward)
    if unknown:
        raise ValueError(f"backward mode {backward!r} takes no option(s) {sorted(unknown)}; it accepts "
                         f"{sorted(mode_options(backward) - {'backward_tol', 'backward_max_iter'}) or 'none'}")


def equilibrium(f: Callable[[Tensor], Tensor], z0: Tensor, forward: str = "anderson", backward: str = "jfb",
                tol: float = 1e-4, max_iter: int = 100, backward_tol: float | None = None,
                backward_max_iter: int | None = None, backward_options: dict | None = None,
                **solver_options) -> tuple[Tensor, SolverStats]:
    """Fixed point z* = f(z*) of any callable (its parameters may require grad).

    Args:
        f: map on tensors shaped like ``z0`` (batch first).
        z0: initial guess; its dtype (float32/float64) is the solve's dtype.
        forward: forward solver name ('anderson', 'fixed_point', ...).
        backward: backward mode name ('jfb', 'implicit', 'neumann', 'unroll', 'phantom').
        tol: per-sample relative residual ||f(z) - z|| / ||f(z)|| to stop at.
        max_iter: forward iteration cap.
        backward_tol, backward_max_iter: for the implicit backward solve (default: tol, max_iter).
        backward_options: mode-specific options (implicit: backward_solver, backward_solver_options;
            neumann: neumann_k; unroll: unroll_steps; phantom: phantom_k, phantom_damping).
            An option the mode does not take is an error, never silently ignored.
        **solver_options: forwarded to the forward solver (Anderson: m, lam, beta; all: bound).

    Returns:
        z: the fixed point, differentiable according to ``backward``.
        stats: :class:`SolverStats` with per-sample iterations, residuals, divergence flags.
    """
    check_names(forward, backward, backward_options)
    solve = partial(FORWARD_SOLVERS[forward], tol=tol, max_iter=max_iter, **solver_options)
    opts = dict(backward_options or {})
    allowed = mode_options(backward)
    if "backward_tol" in allowed:
        opts.setdefault("backward_tol", tol if backward_tol is None else backward_tol)
        opts.setdefault("backward_max_iter", max_iter if backward_max_iter is None else backward_max_iter)
    if "backward_solver_options" in allowed and opts.get("backward_solver", "anderson") == forward:
        opts.setdefault("backward_solver_options", dict(solver_options))  # same solver, same settings
    return BACKWARD_MODES[backward](f, z0, solve, **opts)
