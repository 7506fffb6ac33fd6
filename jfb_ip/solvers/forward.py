"""Forward fixed-point solvers: find z with z = f(z), batched with a stop per sample.

Each solver takes a callable on tensors shaped like ``z0`` and returns ``(z, SolverStats)``.
They know nothing of images: only of batch dimension 0.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import Tensor

from ..linalg import batch_norm2, per_sample, relative_norm, relative_residual
from .stats import SolverStats

FORWARD_SOLVERS: dict[str, Callable] = {}


def register_forward(name: str):
    def deco(fn):
        FORWARD_SOLVERS[name] = fn
        return fn
    return deco


def check_budget(name: str, tol: float, max_iter: int) -> None:
    """A tolerance below zero or a cap below one iteration would silently return the initial guess (or run every
    sample to the cap), and an infinite one would call the first iterate converged: refuse them. ``tol = 0``
    runs every sample to ``max_iter`` (reported as capped, not converged)."""
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"{name}: max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(tol, numbers.Real) or isinstance(tol, bool) or not 0 <= tol < math.inf:  # `not` catches NaN
        raise ValueError(f"{name}: tol must be >= 0 and finite (a relative residual; 0 runs every sample to "
                         f"max_iter), got {tol!r}")


class _Tracker:
    """Keeps, per sample, the lowest-residual iterate, when it first met tol, and divergence."""

    def __init__(self, z0: Tensor, tol: float, max_iter: int, bound: float):
        B = z0.shape[0]
        self.tol, self.bound = tol, bound
        self.best = z0.clone()
        self.best_res = torch.full((B,), float("inf"), device=z0.device, dtype=z0.dtype)
        self.iters = torch.full((B,), max_iter, device=z0.device, dtype=torch.long)
        self.done = torch.zeros(B, dtype=torch.bool, device=z0.device)
        self.diverged = torch.zeros(B, dtype=torch.bool, device=z0.device)
        self.trace: list[Tensor] = []

    def bad(self, t: Tensor) -> Tensor:
        # amax propagates NaN, and neither NaN nor inf is <= bound: one reduction (isfinite().all() is ~10x slower)
        return ~(t.flatten(1).abs().amax(1) <= self.bound)

    def update(self, k: int, z: Tensor, fz: Tensor, diff: Tensor | None = None) -> Tensor:
        """Record iteration k (z, f(z)); ``diff``: f(z) - z when the caller has it. Returns the per-sample
        'bad' mask."""
        bad = self.bad(fz) | self.bad(z)
        self.diverged |= bad & ~self.done
        res = relative_residual(fz, z) if diff is None else relative_norm(batch_norm2(diff), batch_norm2(fz))
        res = torch.where(bad, torch.full_like(res, float("inf")), res)
        improve = (res < self.best_res) & ~self.done & ~self.diverged
        self.best = torch.where(per_sample(improve, fz), fz, self.best)  # one pass; no boolean-mask gather/scatter
        self.best_res = torch.where(improve, res, self.best_res)
        newly = (res < self.tol) & ~self.done & ~self.diverged
        self.iters[newly] = k
        self.done |= newly
        # kept on the device: a .item() here would sync the GPU at every iteration
        self.trace.append(torch.where(torch.isfinite(res), res, torch.zeros_like(res)).max())
        return bad

    @property
    def finished(self) -> bool:
        return bool((self.done | self.diverged).all())

    def stats(self) -> SolverStats:
        res = torch.where(torch.isfinite(self.best_res), self.best_res, torch.full_like(self.best_res, float("nan")))
        trace = torch.stack(self.trace).tolist() if self.trace else []
        # converged = met tol; a sample that ran to max_iter is reported as capped, never as an equilibrium
        return SolverStats(self.iters, res, self.diverged.clone(), self.done & ~self.diverged, trace)


@register_forward("fixed_point")
def fixed_point(f: Callable[[Tensor], Tensor], z0: Tensor, tol: float = 1e-3, max_iter: int = 50,
                bound: float = 1e10) -> tuple[Tensor, SolverStats]:
    """Plain iteration z_{k+1} = f(z_k); a sample stops changing once it meets tol."""
    check_budget("fixed_point", tol, max_iter)
    tr = _Tracker(z0, tol, max_iter, bound)
    z = z0
    for k in range(1, max_iter + 1):
        fz = f(z)
        bad = tr.update(k, z, fz)
        if tr.finished:
            break
        keep = per_sample(tr.done | bad | tr.diverged, z)
        z = torch.where(keep, tr.best, fz)
    return tr.best, tr.stats()


@register_forward("anderson")
def anderson(f: Callable[[Tensor], Tensor], z0: Tensor, tol: float = 1e-3, max_iter: int = 50, m: int = 5,
             lam: float = 1e-4, beta: float = 1.0, bound: float = 1e10,
             scale_lam: bool = True) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration, Alg. 3.1 of Liu et al. [1] (Walker & Ni 2011), batched.

    With g(x) = f(x) - x and the last m_k = min(m, k) iterates, alpha solves
    min ||G_k alpha||^2 s.t. sum(alpha) = 1 (regularised by ``lam``), and
    x^{k+1} = beta * sum_i alpha_i f(x^i) + (1 - beta) * sum_i alpha_i x^i.
    ``scale_lam`` (default): the ridge is lam * mean_i ||g_i||^2, so lam is dimensionless; False: the
    ridge is lam itself (the convention of torchdeq and deepinv, whose solvers the benchmarks compare).
    """
    check_budget("anderson", tol, max_iter)
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"anderson: memory m must be an integer >= 1, got {m!r}")
    if not lam >= 0:
        raise ValueError(f"anderson: regularisation lam must be >= 0, got {lam!r}")
    if not 0 < beta <= 1:
        raise ValueError(f"anderson: damping beta must lie in (0, 1], got {beta!r}")
    shape, B = z0.shape, z0.shape[0]
    n = z0[0].numel()
    # The history keeps F = f(x_i) and G = f(x_i) - x_i (x_i = F - G is never needed by itself), and
    # G G^T is updated one row and column per iteration: O(m n) work per step besides f, not O(m^2 n).
    F = torch.zeros(B, m, n, dtype=z0.dtype, device=z0.device)
    G = torch.zeros_like(F)
    GG = torch.zeros(B, m, m, dtype=z0.dtype, device=z0.device)
    tr = _Tracker(z0, tol, max_iter, bound)
    # Bordered system [[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0] (sum-to-one constraint).
    H = torch.zeros(B, m + 1, m + 1, dtype=z0.dtype, device=z0.device)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    rhs = torch.zeros(B, m + 1, 1, dtype=z0.dtype, device=z0.device)
    rhs[:, 0] = 1
    eye = torch.eye(m, dtype=z0.dtype, device=z0.device)

    z = z0
    for k in range(1, max_iter + 1):
        fz = f(z)
        g = fz - z
        bad = tr.update(k, z, fz, g)
        stop = tr.done | tr.diverged
        n_stop, n_bad = torch.stack([stop.sum(), bad.sum()]).tolist()  # one host sync per iteration
        if n_stop == B:
            break
        if n_bad:  # a diverged sample restarts from its best iterate so it cannot poison the batch
            z = torch.where(per_sample(bad, z), tr.best, z)
            fz = torch.where(per_sample(bad, z), tr.best, fz)
            g = fz - z
        slot = (k - 1) % m
        F[:, slot] = fz.reshape(B, n)
        G[:, slot] = g.reshape(B, n)
        mk = min(k, m)
        row = torch.bmm(G[:, :mk], G[:, slot, :, None])[..., 0]  # <g_i, g_new>, i < mk
        GG[:, slot, :mk] = row
        GG[:, :mk, slot] = row
        GGk = GG[:, :mk, :mk]
        # scale the regulariser with ||G||^2 so lam is dimensionless (unless scale_lam is False)
        scale = GGk.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None, None] if scale_lam else 1.0
        H[:, 1:mk + 1, 1:mk + 1] = GGk + lam * scale * eye[:mk, :mk]
        alpha = torch.linalg.solve(H[:, :mk + 1, :mk + 1], rhs[:, :mk + 1])[:, 1:mk + 1, 0]
        # x_new = beta sum alpha_i f_i + (1 - beta) sum alpha_i x_i, with x_i = f_i - g_i
        z_new = torch.bmm(alpha[:, None], F[:, :mk])[:, 0]
        if beta != 1:
            z_new = z_new - (1 - beta) * torch.bmm(alpha[:, None], G[:, :mk])[:, 0]
        z_new = z_new.reshape(shape)
        z = torch.where(per_sample(stop, z), tr.best, z_new) if n_stop else z_new
    return tr.best, tr.stats()


@register_forward("broyden")
def broyden(f: Callable[[Tensor], Tensor], z0: Tensor, tol: float = 1e-3, max_iter: int = 50, memory: int = 30,
            bound: float = 1e10) -> tuple[Tensor, SolverStats]:
    """Good Broyden's method on g(z) = f(z) - z (as in Bai et al. 2019's DEQ), batched.

    The inverse Jacobian of g is approximated by -I + U V^T with rank-one updates
    u = (dz - H dg) / (v^T dg), v^T = dz^T H; after ``memory`` updates it restarts from -I.
    """
    check_budget("broyden", tol, max_iter)
    if not isinstance(memory, int) or memory < 1:
        raise ValueError(f"broyden: memory must be an integer >= 1, got {memory!r}")
    shape, B = z0.shape, z0.shape[0]
    z = z0.reshape(B, -1)
    n = z.shape[1]
    U = torch.zeros(B, n, memory, dtype=z0.dtype, device=z0.device)
    VT = torch.zeros(B, memory, n, dtype=z0.dtype, device=z0.device)
    tr = _Tracker(z0, tol, max_iter, bound)

    def H(x, k):  # (-I + U V^T) x
        return -x + torch.einsum("bnk,bk->bn", U[..., :k], torch.einsum("bkn,bn->bk", VT[:, :k], x))

    def HT(x, k):  # x^T (-I + U V^T)
        return -x + torch.einsum("bk,bkn->bn", torch.einsum("bn,bnk->bk", x, U[..., :k]), VT[:, :k])

    fz = f(z.reshape(shape)).reshape(B, n)
    gz = fz - z
    bad = tr.update(1, z.reshape(shape), fz.reshape(shape))
    used = 0
    for k in range(2, max_iter + 1):
        if tr.finished:
            break
        update = -H(gz, used)
        z_new = z + update
        fz_new = f(z_new.reshape(shape)).reshape(B, n)
        bad = tr.update(k, z_new.reshape(shape), fz_new.reshape(shape))
        gz_new = fz_new - z_new
        dz, dg = z_new - z, gz_new - gz
        z, gz = z_new, gz_new
        if used == memory:  # restart the low-rank memory
            U.zero_(), VT.zero_()
            used = 0
        vT = HT(dz, used)
        denom = (vT * dg).sum(1, keepdim=True)
        u = (dz - H(dg, used)) / torch.where(denom.abs() > 1e-30, denom, torch.ones_like(denom))
        U[..., used] = torch.nan_to_num(u)
        VT[:, used] = torch.nan_to_num(vT)
        used += 1
        stop = (tr.done | tr.diverged | bad)
        if stop.any():  # frozen or diverged samples sit at their best iterate with no memory
            best = tr.best.reshape(B, n)
            z = torch.where(stop[:, None], best, z)
            gz = torch.where(stop[:, None], torch.zeros_like(gz), gz)
            U[stop] = 0
            VT[stop] = 0
    return tr.best, tr.stats()
