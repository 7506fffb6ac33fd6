"""Gaussian blur as a linear operator (the deblurring task of papers 000, 002, 004)."""
from __future__ import annotations

import torch
from kornia.filters import filter2d, get_gaussian_kernel2d
from torch import Tensor

from ..linalg import per_sample
from .operator import LinearOperator

_PADDING = {"circular": "circular", "zeros": "constant"}


class GaussianBlur(LinearOperator):
    """A x = k * x, a 'same'-size convolution with one (or one per sample) kernel.

    ``padding='circular'`` makes A diagonal in the Fourier basis, so A^T, the data prox of
    ADMM and the Wiener filter are exact FFT formulas; ``padding='zeros'`` is also exact:
    its adjoint is the correlation with the same zero padding.

    Args:
        kernel: (kh, kw) or (B, kh, kw) with odd sides; one kernel per sample when batched.
        padding: 'circular' (default) or 'zeros'.
    """

    def __init__(self, kernel: Tensor, padding: str = "circular"):
        if padding not in _PADDING:
            raise ValueError(f"GaussianBlur: padding must be one of {sorted(_PADDING)}, got {padding!r}")
        if kernel.dim() == 2:
            kernel = kernel[None]
        if kernel.dim() != 3 or kernel.shape[-1] % 2 == 0 or kernel.shape[-2] % 2 == 0:
            raise ValueError(f"GaussianBlur: kernel must be (B, kh, kw) with odd sides, got {tuple(kernel.shape)}")
        self.kernel = kernel
        self.padding = padding

    @classmethod
    def from_std(cls, kernel_size: int, std: float | Tensor, padding: str = "circular", batch: int = 1,
                 device=None, dtype=torch.float32) -> "GaussianBlur":
        """Kernel of side ``kernel_size`` whose Gaussian has standard deviation ``std`` (variance = std**2)."""
        std = torch.as_tensor(std, dtype=dtype, device=device).reshape(-1)
        std = std.expand(batch) if std.numel() == 1 else std
        sigma = torch.stack([std, std], dim=-1)
        kernel = get_gaussian_kernel2d((kernel_size, kernel_size), sigma)
        return cls(kernel.to(device=device, dtype=dtype), padding)

    def _check(self, x: Tensor) -> None:
        kh, kw = self.kernel.shape[-2:]
        if x.dim() != 4:
            raise ValueError(f"GaussianBlur expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] < kh or x.shape[-1] < kw:
            raise ValueError(f"GaussianBlur: image {tuple(x.shape[-2:])} is smaller than the kernel {(kh, kw)}; "
                             f"use larger images (data.image_size) or a smaller kernel (task.kernel_size)")
        if self.kernel.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"GaussianBlur holds {self.kernel.shape[0]} kernels for a batch of {x.shape[0]}")

    def A(self, x: Tensor) -> Tensor:
        self._check(x)
        return filter2d(x, self.kernel.to(x.dtype), border_type=_PADDING[self.padding], behaviour="conv")

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check(y)
        return filter2d(y, self.kernel.to(y.dtype), border_type=_PADDING[self.padding], behaviour="corr")

    def init(self, y: Tensor) -> Tensor:
        """The blurred image itself is the natural initial guess (Liu et al. [1]: x^0 depends on d)."""
        return y

    # --- closed forms for circular padding -------------------------------------------------
    def _power_iteration(self, shape, dtype, device, n_iter: int) -> Tensor:
        """lambda_max(A^T A) = max_w |K(w)|^2 exactly for circular padding; power iteration otherwise."""
        if self.padding != "circular":
            return super()._power_iteration(shape, dtype, device, n_iter)
        K = self.transfer_function(shape[-2:], dtype, device)
        return (K.abs() ** 2).flatten(1).amax(1).expand(shape[0]).clone()

    def transfer_function(self, shape: tuple[int, int], dtype, device) -> Tensor:
        """FFT of the kernel embedded in an H x W grid with its centre at the origin -> (B|1, 1, H, W//2+1)."""
        H, W = shape
        kh, kw = self.kernel.shape[-2:]
        k = torch.zeros(self.kernel.shape[0], H, W, dtype=dtype, device=device)
        k[:, :kh, :kw] = self.kernel.to(dtype)
        k = torch.roll(k, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
        return torch.fft.rfft2(k)[:, None]

    def fourier_multiplier(self, shape: tuple[int, int], dtype, device) -> Tensor | None:
        """A is diagonal in the 2D Fourier basis with this rfft2-shaped multiplier (circular padding only)."""
        return self.transfer_function(shape, dtype, device) if self.padding == "circular" else None

    def _fft_solve(self, rhs_hat_fn, denom_extra: Tensor, y_like: Tensor) -> Tensor:
        K = self.transfer_function(y_like.shape[-2:], y_like.dtype, y_like.device)
        num = rhs_hat_fn(K)
        return torch.fft.irfft2(num / (K.abs() ** 2 + denom_extra), s=y_like.shape[-2:])

    def prox_is_closed_form(self) -> bool:
        return self.padding == "circular"

    def prox_data(self, v: Tensor, rho, y: Tensor, n_iter: int = 100, tol: float = 1e-6) -> Tensor:
        if self.padding != "circular":
            return super().prox_data(v, rho, y, n_iter, tol)
        rho_b = per_sample(rho, v)
        return self._fft_solve(lambda K: K.conj() * torch.fft.rfft2(y) + rho_b * torch.fft.rfft2(v), rho_b, y)
