"""Backward modes: how the gradient flows through a fixed point z* = f(z*).

One registry; each mode is ``fn(f, z0, solve, **options) -> (z, stats)`` where ``solve(f, z0)``
is the configured forward solver (called under no_grad by the modes that want it). Selecting
a mode by name is all a method or config needs, so ``method x backward`` is a free product.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from .forward import FORWARD_SOLVERS, check_budget
from ..linalg import batch_norm2, conjugate_gradient, per_sample, relative_norm, relative_residual
from .stats import SolverStats

BACKWARD_MODES: dict[str, Callable] = {}


def mode_options(mode: str) -> set[str]:
    """The option names a backward mode accepts (its keyword arguments after f, z0, solve)."""
    return set(list(inspect.signature(BACKWARD_MODES[mode]).parameters)[3:])


def _integer(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"backward option {name} must be an integer >= {low}, got {value!r}")


def register_backward(name: str):
    def deco(fn):
        BACKWARD_MODES[name] = fn
        return fn
    return deco


def _solve_no_grad(f, z0, solve):
    with torch.no_grad():
        z_star, stats = solve(f, z0)
    return z_star.detach(), stats


@register_backward("jfb")
def jfb(f, z0, solve) -> tuple[Tensor, SolverStats]:
    """Jacobian-free backprop, Alg. 4.1 of Liu et al. [1]: solve without a graph, then output
    T(z*) once with the graph, so the gradient is p = dl/dz* . dT(z*)/dTheta (eq. 4.1)."""
    z_star, stats = _solve_no_grad(f, z0, solve)
    return f(z_star), stats


def _vjp_fn(fz: Tensor, z: Tensor):
    return lambda u: torch.autograd.grad(fz, z, u, retain_graph=True)[0]


@register_backward("implicit")
def implicit(f, z0, solve, *, backward_tol: float, backward_max_iter: int, backward_solver: str = "anderson",
             backward_solver_options: dict | None = None) -> tuple[Tensor, SolverStats]:
    """Exact gradient by the implicit function theorem (eq. 3.9-3.10 of Liu et al. [1]).

    The incoming gradient g is replaced by u solving u = g + J^T u, J = df/dz at z*,
    inside a tensor hook, so autograd then carries u^T df/dTheta to the parameters.
    ``backward_solver`` is a forward-solver name (the linear fixed point is solved like any
    other) or 'cg' for conjugate gradient on the normal equations (Liu et al. [1] §5.3).
    ``backward_solver_options`` (e.g. Anderson's m, lam) default to the forward solver's
    when both use the same solver; ``backward_tol``/``backward_max_iter`` have no default here:
    :func:`equilibrium` passes the forward solver's unless they are set. The hook fires once: a
    second backward through the same output (retain_graph) gets the plain JFB gradient.
    """
    check_budget("implicit backward solve", backward_tol, backward_max_iter)
    if backward_solver != "cg" and backward_solver not in FORWARD_SOLVERS:
        raise ValueError(f"implicit: unknown backward_solver {backward_solver!r}; choose from "
                         f"{sorted(FORWARD_SOLVERS) + ['cg']}")
    z_star, stats = _solve_no_grad(f, z0, solve)
    if not torch.is_grad_enabled():
        return f(z_star), stats
    z_star = z_star.requires_grad_()
    fz = f(z_star)
    if not fz.requires_grad:
        return fz, stats
    opts = dict(backward_solver_options or {})

    def hook(g: Tensor) -> Tensor:
        handle.remove()  # the vjp calls below must not re-enter this hook
        vjp = _vjp_fn(fz, z_star)
        with torch.enable_grad():
            if backward_solver == "cg":
                u, bstats = _cg_normal(vjp, fz, z_star, g, backward_tol, backward_max_iter)
            else:
                u, bstats = FORWARD_SOLVERS[backward_solver](lambda u: vjp(u) + g, g, tol=backward_tol,
                                                             max_iter=backward_max_iter, **opts)
        stats.backward_iterations, stats.backward_residual = bstats.iterations, bstats.residual
        return u.detach()

    handle = fz.register_hook(hook)
    return fz, stats


def _cg_normal(vjp, fz, z_star, g, tol, max_iter):
    """Solve (I - J)^T u = g through (I - J)(I - J)^T u = (I - J) g by batched CG.

    J v (a forward-mode product) comes from the double-vjp trick: J v = d/dw <J^T w, v>.
    """
    w = torch.zeros_like(g, requires_grad=True)
    jt_w = torch.autograd.grad(fz, z_star, w, create_graph=True)[0]

    def jvp(v):
        return torch.autograd.grad(jt_w, w, v, retain_graph=True)[0]

    def apply(u):
        a = u - vjp(u)
        return a - jvp(a)

    b = g - jvp(g)
    u, iters = conjugate_gradient(apply, b, g.clone(), max_iter, tol, return_iterations=True)
    # reported like every other backward solve: the residual of u = g + J^T u itself
    res = relative_residual(g + vjp(u), u)
    bad = ~torch.isfinite(res)
    return u, SolverStats(iters, res, bad, (res <= tol) & ~bad)


@register_backward("neumann")
def neumann(f, z0, solve, neumann_k: int = 5) -> tuple[Tensor, SolverStats]:
    """Truncated Neumann series (eq. 4.2 of Liu et al. [1]): u = sum_{i=0}^{j} (J^T)^i g, j <= k.
    k = 0 is JFB; k -> infinity is the implicit gradient where the series converges.

    Each sample's sum stops at its smallest term (optimal truncation): where ||J|| < 1 the terms shrink, so
    j = k and this is the textbook series; where Lip(T) > 1 they can grow, and the k-term sum, dominated by its
    last terms, would be no estimate of (I - J^T)^{-1} g (on the deblurring default it wrecked training near
    step 115). ``backward_iterations`` reports j per sample."""
    _integer("neumann_k", neumann_k, 0)
    z_star, stats = _solve_no_grad(f, z0, solve)
    if not torch.is_grad_enabled() or neumann_k == 0:
        return f(z_star), stats
    z_star = z_star.requires_grad_()
    fz = f(z_star)

    def hook(g: Tensor) -> Tensor:
        handle.remove()
        vjp = _vjp_fn(fz, z_star)
        term = u = best = g
        smallest = batch_norm2(g)
        used = torch.zeros(g.shape[0], dtype=torch.long, device=g.device)
        with torch.enable_grad():
            for i in range(1, neumann_k + 1):
                term = vjp(term)
                u = u + term
                size = batch_norm2(term)
                better = size <= smallest  # NaN never is
                best = torch.where(per_sample(better, u), u, best)
                smallest = torch.where(better, size, smallest)
                used = torch.where(better, i, used)
        stats.backward_iterations = used
        # the last term kept relative to the sum: (J^T)^j g / ||u_j||, with no extra vjp
        stats.backward_residual = relative_norm(smallest, batch_norm2(best)).detach()
        return best.detach()

    handle = fz.register_hook(hook)
    return fz, stats


@register_backward("unroll")
def unroll(f, z0, solve, unroll_steps: int = 20) -> tuple[Tensor, SolverStats]:
    """Backpropagate through ``unroll_steps`` plain iterations from z0, graph kept (the
    memory-hungry reference: memory grows linearly with the number of steps). The forward
    solver is not used; the reported residual is that of the last iterate, and the sample
    counts as converged if it is below the solver's ``tol``. A sample that turns non-finite
    is frozen at its last finite iterate, so its NaN never reaches the other samples' gradient."""
    _integer("unroll_steps", unroll_steps, 1)
    # solve is equilibrium()'s partial of the forward solver: its tol and bound judge the iterate
    tol = solve.keywords["tol"]
    bound = solve.keywords.get("bound", inspect.signature(solve.func).parameters["bound"].default)
    bad = torch.zeros(z0.shape[0], dtype=torch.bool, device=z0.device)
    z = fz = z0
    for _ in range(unroll_steps):
        z, fz = fz, f(fz)
        flat = fz.detach().flatten(1)
        bad = bad | ~torch.isfinite(flat).all(1) | (flat.abs().amax(1) > bound)
        fz = torch.where(per_sample(bad, fz), z.detach(), fz)
    res = relative_residual(fz.detach(), z.detach())
    iters = torch.full((z0.shape[0],), unroll_steps, dtype=torch.long, device=z0.device)
    return fz, SolverStats(iters, res, bad, (res <= tol) & ~bad)


@register_backward("phantom")
def phantom(f, z0, solve, phantom_k: int = 5, phantom_damping: float = 0.5) -> tuple[Tensor, SolverStats]:
    """Phantom gradient (Geng et al. 2021): k damped differentiable steps
    z <- (1 - d) z + d f(z) started at the no-grad fixed point z*."""
    _integer("phantom_k", phantom_k, 1)
    if not 0 < phantom_damping <= 1:
        raise ValueError(f"backward option phantom_damping must lie in (0, 1], got {phantom_damping!r}")
    z_star, stats = _solve_no_grad(f, z0, solve)
    if not torch.is_grad_enabled():
        return f(z_star), stats
    z = z_star
    for _ in range(phantom_k):
        z = (1 - phantom_damping) * z + phantom_damping * f(z)
    return z, stats
