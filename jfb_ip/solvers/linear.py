"""Batched linear algebra on tensors with a batch dimension (shared by physics and backward modes)."""
from __future__ import annotations

import torch
from torch import Tensor


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product <a_i, b_i> over all non-batch dimensions -> (B,)."""
    return (a * b).flatten(1).sum(1)


def batch_norm2(a: Tensor) -> Tensor:
    """Per-sample Euclidean norm over all non-batch dimensions -> (B,)."""
    return a.flatten(1).norm(dim=1)


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


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
        x = x + _col(alpha, x) * p
        r = r - _col(alpha, r) * Ap
        rs_new = batch_dot(r, r)
        beta = torch.where(active, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        p = r + _col(beta, p) * p
        rs = rs_new
    return (x, iters) if return_iterations else x
