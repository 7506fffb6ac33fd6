"""Linear forward operators ``A`` with their exact adjoints.

Every operator acts on a batch ``(B, C, H, W)``; parameters that vary per sample (a blur
kernel, a mask, ...) are stored batched on the operator, so one object serves a whole
batch. This is what lets a multi-task batch (Willingham et al. [4]) reuse the same methods.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kornia.filters import filter2d

from ..linalg import batch_dot, batch_norm2, conjugate_gradient, per_sample


def laplacian(x: Tensor, border: str) -> Tensor:
    """D^T D x for forward differences D with the given kornia border (symmetric PSD): the
    'gradient' prior of the Tikhonov/Wiener inverse."""
    k = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]], dtype=x.dtype, device=x.device)
    return filter2d(x, k[None], border_type=border)


class LinearOperator:
    """Base class: subclasses implement :meth:`A` and :meth:`A_adjoint`.

    ``lambda_max(shape)`` returns L = lambda_max(A^T A) per sample (the constant of Theorem
    3.1 of Liu et al. [1]), found by power iteration and cached per input shape.
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

    def lambda_max(self, shape: tuple[int, ...], dtype=torch.float32, device=None, n_iter: int = 50) -> Tensor:
        """lambda_max(A^T A) = ||A||^2 per sample (B,) for images of ``shape`` (B, C, H, W),
        by power iteration, cached per shape/dtype/device."""
        shape = tuple(shape)
        key = (shape, dtype, torch.device(device) if device is not None else torch.device("cpu"))
        cache = self.__dict__.setdefault("_lambda_max_cache", {})
        if key not in cache:
            cache[key] = self._power_iteration(shape, dtype, key[2], n_iter)
        return cache[key]

    def _power_iteration(self, shape, dtype, device, n_iter: int) -> Tensor:
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            v = torch.randn(shape, generator=g, device=device, dtype=dtype)
            v = v / per_sample(batch_norm2(v), v)
            lam = torch.zeros(shape[0], dtype=dtype, device=device)
            for _ in range(n_iter):
                w = self.AtA(v)
                lam = batch_dot(v, w)
                v = w / per_sample(batch_norm2(w).clamp_min(1e-30), w)
        return lam

    def fourier_multiplier(self, shape: tuple[int, int], dtype, device) -> Tensor | None:
        """The rfft2-shaped multiplier K with A x = irfft2(K rfft2(x)) when A is a circular
        convolution (closed-form solves use it); None for operators that are not."""
        return None

    def prox_is_closed_form(self) -> bool:
        """Whether :meth:`prox_data` is an exact closed form (FFT, pixel-wise) rather than conjugate gradient:
        methods that call the data prox at every iteration (TV's primal-dual steps) use it only then."""
        return False

    def prox_data(self, v: Tensor, rho: Tensor | float, y: Tensor, n_iter: int = 100, tol: float = 1e-6) -> Tensor:
        """argmin_x 1/2||Ax - y||^2 + rho/2 ||x - v||^2 = (A^T A + rho I)^{-1}(A^T y + rho v).

        Generic batched conjugate gradient; operators with a closed form override it.
        """
        rho_b = per_sample(rho, v)
        return conjugate_gradient(lambda x: self.AtA(x) + rho_b * x, self.A_adjoint(y) + rho_b * v, v, n_iter, tol)

    def to(self, device=None, dtype=None) -> "LinearOperator":
        """Move every tensor attribute (kernels, masks) to ``device``/``dtype`` in place."""
        for k, val in list(vars(self).items()):
            if torch.is_tensor(val):
                setattr(self, k, val.to(device=device, dtype=dtype if val.is_floating_point() else None))
        self.__dict__.pop("_lambda_max_cache", None)
        return self
