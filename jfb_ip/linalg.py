"""Batched linear algebra on tensors with a batch dimension, at the bottom of the package (it imports
torch only): the one broadcast helper, the one relative-residual definition and CG that physics,
solvers and methods share."""
from __future__ import annotations

import torch
from torch import Tensor


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product <a_i, b_i> over all non-batch dimensions -> (B,)."""
    return (a * b).flatten(1).sum(1)


def batch_norm2(a: Tensor) -> Tensor:
    """Per-sample Euclidean norm over all non-batch dimensions -> (B,)."""
    return a.flatten(1).norm(dim=1)


def per_sample(v: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or a per-sample (B,) value shaped to broadcast against ``like`` (B, ...),
    in ``like``'s dtype and device (a boolean mask stays boolean). A 0-d value stays 0-d."""
    if not (torch.is_tensor(v) and v.dtype == torch.bool):
        v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def relative_residual(fz: Tensor, z: Tensor) -> Tensor:
    """||f(z) - z|| / ||f(z)|| per sample: the stopping criterion of every forward and backward
    solve, and what ``SolverStats.residual`` reports."""
    return relative_norm(batch_norm2(fz - z), batch_norm2(fz))


def relative_norm(step: Tensor, size: Tensor) -> Tensor:
    """:func:`relative_residual` from per-sample norms already taken: ``step / size``, ``size`` kept off 0."""
    return step / size.clamp_min(1e-12)


def conjugate_gradient(apply, b: Tensor, x0: Tensor, n_iter: int = 100, tol: float = 1e-6,
                       return_iterations: bool = False):
    """Batched CG for a symmetric positive definite ``apply``; each sample stops on its own
    relative residual ||b - Ax|| / ||b|| < tol (converged samples take zero steps).
    With ``return_iterations`` also returns the per-sample number of steps taken."""
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rs = batch_dot(r, r)
    b_norm2 = batch_dot(b, b).clamp_min(1e-30)
    iters = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    for _ in range(n_iter):
        active = rs > (tol**2) * b_norm2
        if not bool(active.any()):
            break
        iters += active.long()
        Ap = apply(p)
        alpha = torch.where(active, rs / batch_dot(p, Ap).clamp_min(1e-30), torch.zeros_like(rs))
        x = x + per_sample(alpha, x) * p
        r = r - per_sample(alpha, r) * Ap
        rs_new = batch_dot(r, r)
        beta = torch.where(active, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        p = r + per_sample(beta, p) * p
        rs = rs_new
    return (x, iters) if return_iterations else x
