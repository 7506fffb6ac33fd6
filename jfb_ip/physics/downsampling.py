"""Anti-aliased decimation: the super-resolution task of Willingham et al. [4] §III ("bicubic down-sampling
with factor f_downscale in {1, 2, 3, 4}, ... initialized using bilinear resizing to the original
size"; its Table II also tests a Gaussian anti-aliasing kernel).

Sampling geometry (MATLAB ``imresize`` convention): low-resolution pixel u is the centre of the
f x f block of high-resolution pixels u*f .. u*f + f - 1, i.e. it sits at high-resolution
position u*f + (f - 1)/2. Filter taps therefore sit at half-integer offsets from that centre for
even f (an even number of taps) and at integer offsets for odd f (odd number of taps).

The bicubic kernel is MATLAB's antialiasing ``imresize`` kernel for scale 1/f: Keys' cubic
(a = -0.5) stretched by f, w(d) = cubic(d / f), support |d| < 2f, normalised to sum 1. (deepinv's
``bicubic_filter`` uses the same cubic but always half-integer offsets, i.e. for odd f it is
shifted by half a pixel relative to MATLAB; here the block centre is kept for every f.)

Boundaries are circular, so A is an exact linear map with the exact adjoint A^T: zero-upsample
(a strided transposed convolution) and wrap the overhang back around the image. Circularity
also makes A A^T a circular convolution on the low-resolution grid, which gives lambda_max and
the data prox in closed form (Zhao et al., "Fast single image super-resolution using a new
analytical solution for l2-l2 problems", IEEE TIP 2016).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..linalg import per_sample
from .operator import LinearOperator

FILTERS = ("bicubic", "gaussian")
INIT_MODES = ("bilinear", "bicubic")


def _cubic(t: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    t = t.abs()
    near = ((a + 2) * t**3 - (a + 3) * t**2 + 1) * (t <= 1)
    far = (a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a) * ((t > 1) & (t < 2))
    return near + far


def filter_taps(factor: int, filter: str = "bicubic", sigma: float | None = None) -> tuple[Tensor, int]:
    """1D taps (float64) of the anti-aliasing filter and the offset ``p`` of the first one:
    low-resolution pixel u = sum_t w[t] x[u * factor + t - p] (indices modulo the image size)."""
    f = int(factor)
    frac = 0.5 * ((f - 1) % 2)  # taps sit at d in Z + frac from the block centre
    if filter == "bicubic":
        radius = 2.0 * f
    elif filter == "gaussian":
        sigma = f / 2.0 if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"Downsampling: sigma must be > 0, got {sigma}")
        radius = max(3.0 * sigma, f / 2.0)
    else:
        raise ValueError(f"Downsampling: filter must be one of {FILTERS}, got {filter!r}")
    n = math.ceil(radius) + 1
    d = torch.arange(-n, n + 1, dtype=torch.float64) + frac
    d = d[d.abs() < radius] if filter == "bicubic" else d[d.abs() <= radius]
    w = _cubic(d / f) if filter == "bicubic" else torch.exp(-0.5 * (d / sigma) ** 2)
    w = w / w.sum()
    # index of tap t: u*f + (f-1)/2 + d[t] = u*f + t - p
    p = -round((f - 1) / 2 + d[0].item())
    return w, p


class Downsampling(LinearOperator):
    """A x = (h * x) decimated by ``factor`` (keep one pixel per f x f block), circular boundaries.

    y has shape (B, C, H/f, W/f); A^T maps it back to (B, C, H, W) (the image size is y's size
    times f, so nothing about the image needs storing). H and W must be multiples of f.

    Args:
        factor: integer decimation factor (Willingham et al. [4] use 2, 3, 4; 1 with 'bicubic' is the identity).
        filter: 'bicubic' (MATLAB imresize antialiasing kernel, see the module docstring) or
            'gaussian' (a sampled Gaussian, normalised to sum 1, truncated at 3 sigma).
        sigma: standard deviation in high-resolution pixels of the 'gaussian' filter; default
            factor / 2 (the width of half a decimation block).
        init_mode: how :meth:`init` resizes y to the image size: 'bilinear' (Willingham et al. [4]) or 'bicubic'.
    """

    def __init__(self, factor: int, filter: str = "bicubic", sigma: float | None = None, init_mode: str = "bilinear"):
        if int(factor) != factor or factor < 1:
            raise ValueError(f"Downsampling: factor must be a positive integer, got {factor!r}")
        if init_mode not in INIT_MODES:
            raise ValueError(f"Downsampling: init_mode must be one of {INIT_MODES}, got {init_mode!r}")
        self.factor, self.filter_name, self.init_mode = int(factor), filter, init_mode
        w, self.offset = filter_taps(self.factor, filter, sigma)
        # (1, L, L): leading 1 so Measurement.subset never mistakes the shared filter for per-sample data
        self.filter = torch.outer(w, w)[None]

    def _check(self, x: Tensor, low_res: bool) -> None:
        if x.dim() != 4:
            raise ValueError(f"Downsampling expects (B, C, H, W), got shape {tuple(x.shape)}")
        if not low_res:
            self._check_size(x.shape[-2:])

    def _check_size(self, size) -> None:
        if size[-2] % self.factor or size[-1] % self.factor:
            raise ValueError(f"Downsampling: image size {tuple(size)} is not divisible by the factor "
                             f"{self.factor}; crop or resize the images to a multiple of {self.factor} "
                             f"(e.g. data.image_size)")

    def _wrap_index(self, n: int, device) -> Tensor:
        # high-resolution index of every position of the circularly padded axis, any padding width
        L = self.filter.shape[-1]
        return (torch.arange(n + L - self.factor, device=device) - self.offset) % n

    def A(self, x: Tensor) -> Tensor:
        self._check(x, low_res=False)
        B, C, H, W = x.shape
        k = self.filter.to(device=x.device, dtype=x.dtype)[None]
        xp = x.reshape(B * C, 1, H, W)
        xp = xp.index_select(2, self._wrap_index(H, x.device)).index_select(3, self._wrap_index(W, x.device))
        y = F.conv2d(xp, k, stride=self.factor)
        return y.reshape(B, C, H // self.factor, W // self.factor)

    def _polyphase(self, T: int, dtype, device) -> Tensor:
        # (s^2, 1, T, T): the filter zero-padded to T s taps, phase (p, q) = k[p::s, q::s] flipped, in pixel-shuffle
        # order p s + q
        s, L = self.factor, self.filter.shape[-1]
        k = F.pad(self.filter.to(device=device, dtype=dtype), (0, T * s - L, 0, T * s - L))[0]
        return torch.stack([k[p::s, q::s].flip(-1, -2) for p in range(s) for q in range(s)])[:, None]

    def A_adjoint(self, y: Tensor) -> Tensor:
        self._check(y, low_res=True)
        B, C, h, w = y.shape
        H, W = h * self.factor, w * self.factor
        s, L = self.factor, self.filter.shape[-1]
        # the exact transpose of the strided correlation (conv_transpose2d with stride s), in polyphase form: output
        # phase (p, q) is the full convolution of y with the sub-kernel k[p::s, q::s], so one stride-1 conv2d with s^2
        # output channels and a pixel shuffle: L^2 multiply-adds per low-resolution pixel instead of per
        # high-resolution one (6-16x faster on CPU than conv_transpose2d for x2-x4 on 48x48 crops)
        T = -(-L // s)
        zp = F.conv2d(F.pad(y.reshape(B * C, 1, h, w), (T - 1,) * 4), self._polyphase(T, y.dtype, y.device))
        zp = F.pixel_shuffle(zp, s)[..., :(h - 1) * s + L, :(w - 1) * s + L]
        zh = zp.new_zeros(B * C, 1, H, zp.shape[-1]).index_add(2, self._wrap_index(H, y.device), zp)
        z = zh.new_zeros(B * C, 1, H, W).index_add(3, self._wrap_index(W, y.device), zh)
        return z.reshape(B, C, H, W)

    def init(self, y: Tensor) -> Tensor:
        """y resized to the image size by bilinear (Willingham et al. [4]) or bicubic interpolation."""
        self._check(y, low_res=True)
        size = (y.shape[-2] * self.factor, y.shape[-1] * self.factor)
        return F.interpolate(y, size=size, mode=self.init_mode, align_corners=False)

    # --- closed forms: A A^T is a circular convolution on the low-resolution grid -------------
    def aat_multiplier(self, shape: tuple[int, int], dtype, device) -> Tensor:
        """The real DFT multiplier M (1, 1, h, w) of A A^T on the low-resolution grid ``shape``.

        Taken from the impulse response of this very implementation, so it matches A exactly.
        A A^T is symmetric, so M is real (its imaginary part is rounding noise)."""
        h, w = shape
        delta = torch.zeros(1, 1, h, w, dtype=dtype, device=device)
        delta[..., 0, 0] = 1
        return torch.fft.fft2(self.A(self.A_adjoint(delta))).real

    def _power_iteration(self, shape, dtype, device, n_iter: int) -> Tensor:
        """lambda_max(A^T A) = lambda_max(A A^T) = max M exactly."""
        self._check_size(tuple(shape[-2:]))
        M = self.aat_multiplier((shape[-2] // self.factor, shape[-1] // self.factor), dtype, device)
        return M.amax().expand(shape[0]).clone()

    def prox_is_closed_form(self) -> bool:
        return True

    def prox_data(self, v: Tensor, rho, y: Tensor, n_iter: int = 100, tol: float = 1e-6) -> Tensor:
        """(A^T A + rho I)^{-1} r with r = A^T y + rho v, by Woodbury:
        (1/rho)(r - A^T (A A^T + rho I)^{-1} A r), the inner inverse being diagonal in the
        low-resolution Fourier basis (Zhao et al. 2016). Needs rho > 0."""
        rho_b = per_sample(rho, v)
        r = self.A_adjoint(y) + rho_b * v
        M = self.aat_multiplier(y.shape[-2:], v.dtype, v.device)
        inner = torch.fft.ifft2(torch.fft.fft2(self.A(r)) / (M + rho_b)).real
        return (r - self.A_adjoint(inner)) / rho_b
