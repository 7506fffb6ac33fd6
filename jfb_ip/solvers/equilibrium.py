"""The one entry point: ``z, stats = equilibrium(f, z0, forward=..., backward=...)``."""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from .backward import BACKWARD_MODES, mode_options
from .forward import FORWARD_SOLVERS, check_budget
from .stats import SolverStats


def solver_options(forward: str) -> set[str]:
    """The option names a forward solver accepts besides ``tol`` and ``max_iter``."""
    return set(list(inspect.signature(FORWARD_SOLVERS[forward]).parameters)[2:]) - {"tol", "max_iter"}


def check_start(f, z0, tol, max_iter) -> None:
    """Refuse, before any iteration, what would fail later with a message naming something else: ``f`` not
    callable; ``z0`` not a floating-point tensor with a batch dimension and a sample in it; ``tol`` not a finite
    number >= 0 (``'1e-3'``, ``inf``: every first iterate would count as converged); ``max_iter`` below 1."""
    if not callable(f):
        raise ValueError(f"equilibrium: f must be a callable map on tensors shaped like z0, got {type(f).__name__}")
    if not torch.is_tensor(z0):
        raise ValueError(f"equilibrium: z0 must be a tensor shaped (B, ...), got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise ValueError(f"equilibrium: z0 must be a floating-point tensor (its dtype is the solve's), got {z0.dtype}")
    if z0.dim() < 2:
        raise ValueError(f"equilibrium: z0 must be batched, shaped (B, ...) with at least one dimension after the "
                         f"batch dimension, got shape {tuple(z0.shape)}")
    if z0.numel() == 0:
        raise ValueError(f"equilibrium: z0 is empty (shape {tuple(z0.shape)}): no sample to solve for")
    check_budget("equilibrium", tol, max_iter)


def _checked(f: Callable[[Tensor], Tensor], same_dtype: bool) -> Callable[[Tensor], Tensor]:
    """``f`` with its output checked at every evaluation (a tuple compare, negligible beside any map worth
    solving): one tensor shaped like its input, and in its dtype unless autocast runs ``f``. The first evaluation
    is f(z0), so a wrong map fails before any iterate is formed; broyden would otherwise reshape an output of the
    right size silently."""

    def g(z: Tensor) -> Tensor:
        out = f(z)
        if not torch.is_tensor(out):
            raise ValueError(f"equilibrium: f must return one tensor shaped like its input {tuple(z.shape)}, it "
                             f"returned a {type(out).__name__}")
        if out.shape != z.shape:
            what = (f"a batch of {out.shape[0]} for a batch of {z.shape[0]}" if out.dim() and out.shape[0] != z.shape[0]
                    else f"shape {tuple(out.shape)}")
            raise ValueError(f"equilibrium: f must return a tensor shaped like its input {tuple(z.shape)}, it "
                             f"returned {what}")
        if same_dtype and out.dtype != z.dtype:
            raise ValueError(f"equilibrium: f must return z0's dtype {z.dtype}, it returned {out.dtype}")
        return out

    return g


def check_names(forward: str, backward: str, backward_options=None, forward_options=None) -> None:
    """Raise a clear ValueError for an unknown forward solver, backward mode, or an option
    the solver or mode does not take (options are never silently ignored)."""
    if forward not in FORWARD_SOLVERS:
        raise ValueError(f"unknown forward solver {forward!r}; choose from {sorted(FORWARD_SOLVERS)}")
    if backward not in BACKWARD_MODES:
        raise ValueError(f"unknown backward mode {backward!r}; choose from {sorted(BACKWARD_MODES)}")
    unknown = set(forward_options or {}) - solver_options(forward)
    if unknown:
        raise ValueError(f"forward solver {forward!r} takes no option(s) {sorted(unknown)}; it accepts tol, "
                         f"max_iter and {sorted(solver_options(forward))}")
    unknown = set(backward_options or {}) - mode_options(backward)
    if unknown:
        raise ValueError(f"backward mode {backward!r} takes no option(s) {sorted(unknown)}; it accepts "
                         f"{sorted(mode_options(backward)) or 'none'}")


def equilibrium(f: Callable[[Tensor], Tensor], z0: Tensor, forward: str = "anderson", backward: str = "jfb",
                tol: float = 1e-3, max_iter: int = 50, backward_options: dict[str, Any] | None = None,
                **forward_options) -> tuple[Tensor, SolverStats]:
    """Fixed point z* = f(z*) of any callable (its parameters may require grad).

    Args:
        f: map on tensors shaped like ``z0`` (batch first).
        z0: initial guess; its dtype (float32/float64) is the solve's dtype.
        forward: forward solver name ('anderson', 'fixed_point', 'broyden').
        backward: backward mode name ('jfb', 'implicit', 'neumann', 'unroll', 'phantom').
        tol: per-sample relative residual ||f(z) - z|| / ||f(z)|| to stop at: a finite number >= 0 (0 runs every
            sample to ``max_iter``, reported as capped).
        max_iter: forward iteration cap, >= 1.
        backward_options: the mode's own options (implicit: backward_solver, backward_tol,
            backward_max_iter, backward_solver_options; neumann: neumann_k; unroll: unroll_steps;
            phantom: phantom_k, phantom_damping). An option set to None takes its default: for
            ``backward_tol``/``backward_max_iter`` the forward ``tol``/``max_iter`` (their only
            default), for the others the mode function's. An option the mode does not take is an error.
        **forward_options: the forward solver's own options (Anderson: m, lam, beta, scale_lam; Broyden:
            memory; all: bound). An option the solver does not take is an error.

    Returns:
        z: the fixed point, differentiable according to ``backward``.
        stats: :class:`SolverStats` with per-sample iterations, residuals, convergence and divergence.

    Raises:
        ValueError: naming the argument, before any iterate is formed: ``f`` returns something other than one
            tensor shaped like its input (a tuple, another batch size, another shape or dtype); ``z0`` is not a
            floating-point tensor (B, ...) with B >= 1; ``tol`` or ``max_iter`` out of range; an unknown solver,
            mode or option.
    """
    check_start(f, z0, tol, max_iter)
    check_names(forward, backward, backward_options, forward_options)
    solve = partial(FORWARD_SOLVERS[forward], tol=tol, max_iter=max_iter, **forward_options)
    opts = {k: v for k, v in (backward_options or {}).items() if v is not None}
    allowed = mode_options(backward)
    if "backward_tol" in allowed:
        opts.setdefault("backward_tol", tol)
        opts.setdefault("backward_max_iter", max_iter)
    if "backward_solver_options" in allowed and opts.get("backward_solver", "anderson") == forward:
        opts.setdefault("backward_solver_options", dict(forward_options))  # same solver, same settings
    device = z0.device.type
    if not torch.is_autocast_enabled(device):
        return BACKWARD_MODES[backward](_checked(f, same_dtype=True), z0, solve, **opts)
    # Mixed precision (trainer.precision=bf16-mixed): only f runs under autocast. The solver's own algebra
    # (Anderson's G G^T and mixing, residuals) stays in z0's dtype: autocast would run its bmm in bfloat16,
    # whose rounding (~4e-3 relative) lies above the usual tol and no solve would ever converge.
    with torch.autocast(device, enabled=False):
        return BACKWARD_MODES[backward](_under_autocast(_checked(f, same_dtype=False), device), z0, solve, **opts)


def _under_autocast(f: Callable[[Tensor], Tensor], device: str) -> Callable[[Tensor], Tensor]:
    """``f`` run under the caller's autocast, its output back in the iterate's dtype."""
    dtype = torch.get_autocast_dtype(device)

    def g(z: Tensor) -> Tensor:
        with torch.autocast(device, dtype=dtype):
            return f(z).to(z.dtype)

    return g
