"""Pixel-wise completion (inpainting) with random dropped pixels (Willingham et al. [4] §III: "pixel-wise
completion with each pixel having a chance of p_drop of being dropped")."""
from __future__ import annotations

import math

import torch
from kornia.filters import gaussian_blur2d
from torch import Tensor

from ..linalg import per_sample
from .operator import LinearOperator


class Inpainting(LinearOperator):
    """A x = m * x with a 0/1 mask m (1 = kept); A is diagonal, so A = A^T and A^T A = m^2.

    The mask has one channel and is shared by the colour channels: a dropped pixel loses all
    its colours, as in Willingham et al. [4]. Dropped pixels are measured as 0 (y keeps the image's shape).
    The formulas below use m^2 rather than m so that they stay exact for a soft (non-binary) mask.

    Args:
        mask: (B, 1, H, W) one mask per sample, or (1, 1, H, W) shared by the batch.
        init: the initializer :meth:`init`: ``"zeros"`` (y itself, dropped pixels at 0) or ``"fill"`` (each
            dropped pixel from its kept neighbours by normalized convolution, :meth:`fill`).
    """

    INITS = ("zeros", "fill")
    # Gaussian widths tried in turn by fill(): a dropped pixel takes the first at which enough kept pixels lie near
    FILL_SIGMAS = (0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)

    def __init__(self, mask: Tensor, init: str = "zeros"):
        if init not in self.INITS:
            raise ValueError(f"Inpainting: init must be one of {self.INITS}, got {init!r}")
        self.init_mode = init
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"Inpainting: mask must be (B, 1, H, W) or (1, 1, H, W), got {tuple(mask.shape)}")
        self.mask = mask if mask.is_floating_point() else mask.to(torch.get_default_dtype())

    @classmethod
    def random(cls, shape: tuple[int, ...], p_drop: float | Tensor, generator: torch.Generator | None = None,
               device=None, dtype=torch.float32, init: str = "zeros") -> "Inpainting":
        """A fresh mask per sample for images of ``shape`` (B, C, H, W): each pixel is dropped
        independently with probability ``p_drop`` (a float, or one value per sample (B,)); ``init`` as for the
        constructor."""
        if len(shape) != 4:
            raise ValueError(f"Inpainting.random: shape must be (B, C, H, W), got {tuple(shape)}")
        B, _, H, W = shape
        u = torch.rand((B, 1, H, W), generator=generator, device=device, dtype=dtype)
        p = torch.as_tensor(p_drop, dtype=dtype, device=u.device)
        if p.numel() not in (1, B):
            raise ValueError(f"Inpainting.random: p_drop must be a float or have one value per sample ({B}), "
                             f"got {p.numel()} values")
        if bool(((p < 0) | (p > 1)).any()):
            raise ValueError(f"Inpainting.random: p_drop must lie in [0, 1], got {p.tolist()}")
        # u >= p keeps a pixel with probability 1 - p; p = 0 keeps everything (rand is in [0, 1))
        return cls((u >= per_sample(p.reshape(-1), u)).to(dtype), init)

    def _mask_for(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"Inpainting expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != tuple(self.mask.shape[-2:]):
            raise ValueError(f"Inpainting: the mask is {tuple(self.mask.shape[-2:])} but the images are "
                             f"{tuple(x.shape[-2:])}; draw the mask for the image size "
                             f"(Inpainting.random(x.shape, ...))")
        if self.mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"Inpainting holds {self.mask.shape[0]} masks for a batch of {x.shape[0]}")
        return self.mask.to(device=x.device, dtype=x.dtype)

    def A(self, x: Tensor) -> Tensor:
        return x * self._mask_for(x)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return y * self._mask_for(y)

    def AtA(self, x: Tensor) -> Tensor:
        m = self._mask_for(x)
        return x * (m * m)

    def init(self, y: Tensor) -> Tensor:
        """``init="zeros"``: y itself (dropped pixels at 0; it lies in the image domain, like the blurred image of
        Guan et al. [3]); ``init="fill"``: :meth:`fill`."""
        return self.fill(y) if self.init_mode == "fill" else y

    def fill(self, y: Tensor) -> Tensor:
        """Each dropped pixel from the kept ones by normalized convolution, (g * (m y)) / (g * m) with a Gaussian g
        of the smallest width in ``FILL_SIGMAS`` whose window holds at least 5% of a kept pixel's weight (kept pixels
        keep their measured value); a pixel no width reaches gets the sample's mean kept value. Linear in y.

        Why: from y's zeros a fixed-point method must move every dropped pixel the whole way, at eta * lam per
        step for DE-GRAD; from this smooth fill it starts near a classical interpolation (26.90 dB on the embedded
        test crops at p = 0.8, Wiener/Tikhonov 27.45, y 7.28)."""
        m = self._mask_for(y)
        kept = m > 0.5
        out, done = y * m, kept
        side = min(y.shape[-2:])
        for sigma in self.FILL_SIGMAS:
            # reflect padding needs the half-width below the image side
            k = min(2 * math.ceil(3 * sigma) + 1, 2 * ((side - 1) // 2) - 1)
            if k < 3:
                break
            den = gaussian_blur2d(m, (k, k), (sigma, sigma), border_type="reflect")
            est = gaussian_blur2d(y * m, (k, k), (sigma, sigma), border_type="reflect") / den.clamp_min(1e-8)
            new = ~done & (den > 0.05)
            out, done = torch.where(new, est, out), done | new
        mean = (y * m).sum((1, 2, 3), keepdim=True) / (m.sum((1, 2, 3), keepdim=True) * y.shape[1]).clamp_min(1e-8)
        return torch.where(done, out, mean.expand_as(out))

    def _power_iteration(self, shape, dtype, device, n_iter: int) -> Tensor:
        """A^T A is diagonal, so lambda_max = max m^2 per sample exactly (1 if any pixel is kept, else 0)."""
        m = self.mask.to(device=device, dtype=dtype)
        if m.shape[0] not in (1, shape[0]):
            raise ValueError(f"Inpainting holds {m.shape[0]} masks for a batch of {shape[0]}")
        return (m * m).flatten(1).amax(1).expand(shape[0]).clone()

    def prox_is_closed_form(self) -> bool:
        return True

    def prox_data(self, v: Tensor, rho, y: Tensor, n_iter: int = 100, tol: float = 1e-6) -> Tensor:
        """(A^T A + rho I)^{-1}(A^T y + rho v) = (m y + rho v) / (m^2 + rho), pixel by pixel."""
        m = self._mask_for(v)
        rho_b = per_sample(rho, v)
        return (m * y + rho_b * v) / (m * m + rho_b)
