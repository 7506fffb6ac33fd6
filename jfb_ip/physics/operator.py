"""Linear forward operators ``A`` with their exact adjoints.

Every operator acts on a batch ``(B, C, H, W)``; parameters that vary per sample (a blur
kernel, a mask, ...) are stored batched on the operator, so one object serves a whole
batch. This is what lets a multi-task batch (paper 004) reuse the same methods.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.linear import batch_dot, batch_norm2, conjugate_gradient


def _bcast(v: Tensor | float, like: Tensor) -> Tensor:
    """A per-sample scalar (B,) broadcast against ``like`` (B, ...)."""
    if not torch.is_tensor(v):
        return torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class LinearOperator:
    """Base class: subclasses implement :meth:`A` and :meth:`A_adjoint`.

    ``norm()`` returns L = lambda_max(A^T A) per sample (the constant of Theorem 3.1 of
    paper 000), found by power iteration and cached per input shape.
    """

    def A(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def A_adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def AtA(self, x: Tensor) -> Tensor:
        return self.A_adjoint(self.A(x))

    def init(self, y: Tensor) -> Tensor:
        """Initial guess of x from a measurement y (default: A^T y)."""
        return self.A_adjoint(y)

    def norm(self, like: Tensor, n_iter: int = 50) -> Tensor:
        """lambda_max(A^T A) per sample by power iteration on a tensor shaped like ``like``."""
        key = (tuple(like.shape), like.dtype, like.device)
        cache = self.__dict__.setdefault("_norm_cache", {})
        if key not in cache:
            g = torch.Generator(device=like.device).manual_seed(0)
            with torch.no_grad():
                v = torch.randn(like.shape, generator=g, device=like.device, dtype=like.dtype)
                v = v / _bcast(batch_norm2(v), v)
                lam = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
                for _ in range(n_iter):
                    w = self.AtA(v)
                    lam = batch_dot(v, w)
                    v = w / _bcast(batch_norm2(w).clamp_min(1e-30), w)
            cache[key] = lam
        return cache[key]

    def prox_data(self, v: Tensor, rho: Tensor | float, y: Tensor, n_iter: int = 100, tol: float = 1e-6) -> Tensor:
        """argmin_x 1/2||Ax - y||^2 + rho/2 ||x - v||^2 = (A^T A + rho I)^{-1}(A^T y + rho v).

        Generic batched conjugate gradient; operators with a closed form override it.
        """
        rho_b = _bcast(rho, v)
        return conjugate_gradient(lambda x: self.AtA(x) + rho_b * x, self.A_adjoint(y) + rho_b * v, v, n_iter, tol)

    def tikhonov(self, y: Tensor, lam, prior: str = "gradient", n_iter: int = 200, tol: float = 1e-6) -> Tensor:
        """argmin ||Ax - y||^2 + lam ||Px||^2, P = I ('identity') or finite differences ('gradient'),
        by conjugate gradient on the normal equations (the direct/Wiener-type inverse)."""
        if prior not in ("identity", "gradient"):
            raise ValueError(f"tikhonov: prior must be 'identity' or 'gradient', got {prior!r}")
        from .blur import laplacian  # local: blur imports this module

        x0 = self.init(y)
        lam_b = _bcast(lam, x0)
        reg = (lambda x: x) if prior == "identity" else (lambda x: laplacian(x, "replicate"))
        return conjugate_gradient(lambda x: self.AtA(x) + lam_b * reg(x), self.A_adjoint(y), x0, n_iter, tol)

    def to(self, device=None, dtype=None) -> "LinearOperator":
        """Move every tensor attribute (kernels, masks) to ``device``/``dtype`` in place."""
        for k, val in list(vars(self).items()):
            if torch.is_tensor(val):
                setattr(self, k, val.to(device=device, dtype=dtype if val.is_floating_point() else None))
        self.__dict__.pop("_norm_cache", None)
        return self
