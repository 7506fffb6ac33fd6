"""Local Lipschitz constants: the spectral norm of a map's Jacobian at given inputs, per sample."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..linalg import batch_dot, batch_norm2, per_sample


def local_lipschitz(f: Callable[[Tensor], Tensor], x: Tensor, n_iter: int = 30, tol: float = 1e-4,
                    generator: torch.Generator | None = None, return_left: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """||J_f(x_i)||_2 per sample (B,), by power iteration on J^T J.

    J^T u is one vector-Jacobian product; J v comes from the double-vjp trick
    J v = d/du <J^T u, v> (works with in-place and parametrised modules, unlike forward mode).
    ``f`` must act on each sample separately (a batch-block-diagonal Jacobian, e.g. no BatchNorm in
    training mode); the estimate increases towards the true norm and stops when every sample's
    relative change is below ``tol`` or after ``n_iter`` iterations.
    ``return_left``: also return the unit left vector u = J v / ||J v|| of the last iteration (detached), the
    direction in which ||J^T u|| is the estimate (what :meth:`FixedPointMethod.contraction_term` differentiates).
    """
    x = x.detach().requires_grad_(True)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    v = v / per_sample(batch_norm2(v).clamp_min(1e-30), v)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        y = f(x)
        u = torch.zeros_like(y, requires_grad=True)
        jt_u = torch.autograd.grad(y, x, u, create_graph=True)[0]
        for _ in range(n_iter):
            jv = torch.autograd.grad(jt_u, u, v, retain_graph=True)[0]
            left = jv.detach()
            jtjv = torch.autograd.grad(y, x, jv, retain_graph=True)[0]
            new = batch_dot(v, jtjv).clamp_min(0).sqrt()
            v = (jtjv / per_sample(batch_norm2(jtjv).clamp_min(1e-30), jtjv)).detach()
            done = ((new - sigma).abs() <= tol * new).all()
            sigma = new.detach()
            if done:
                break
    if return_left:
        return sigma, left / per_sample(batch_norm2(left).clamp_min(1e-30), left)
    return sigma
