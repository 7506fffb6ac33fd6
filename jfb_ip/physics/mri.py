"""Single-coil accelerated MRI: a 2D Fourier transform keeping a random subset of k-space
columns (Guan et al. [3] §4: "a 2-dimensional Fourier transform with randomly selected rows ...
4x and 8x acceleration"; masks drawn like fastMRI's ``RandomMaskFunc``, Zbontar et al. 2018).

Layout choices:

* k-space is centred (``fftshift``: the zero frequency at index H//2, W//2), as in fastMRI,
  and the mask is given in that centred layout, so a mask's centre band is its middle columns.
* The measurement is REAL: y has shape (B, 2C, H, W), y[:, :C] the real part and y[:, C:] the
  imaginary part of the masked k-space of the C image channels. Keeping every tensor real lets
  the noise, the norms and the methods of the package treat y like any other measurement; the
  inner product of the real/imaginary channels is the real part of the complex one, so the
  adjoint below is the adjoint for that real inner product.
* The image is real (1 channel by default; any C works, each channel transformed alone).
* The 2D FFT is orthonormal (``norm="ortho"``), so F^{-1} = F^* and ||A|| <= 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import per_sample as _per_sample  # ``per_sample`` is also an argument of random()
from .operator import LinearOperator

_FFT_DIMS = (-2, -1)


def _center_fraction(acceleration: float) -> float:
    # fastMRI's pairs (4x, 0.08) and (8x, 0.04): the centre band holds 32% of the sampled columns
    return 0.32 / acceleration


class MRI(LinearOperator):
    """A x = M * F x (returned as real/imaginary channels), A^T y = Re F^{-1}(M * y).

    For a real image, A^T A x = Re(F^* M F x) = F^* M_sym F x with
    M_sym(k) = (M(k) + M(-k)) / 2: the real part pairs each frequency with its mirror, and a
    random column mask is not mirror-symmetric. M_sym is therefore what enters lambda_max and
    the closed-form data prox.

    Args:
        mask: centred-k-space sampling mask, (B, 1, 1, W) column masks or (B, 1, H, W) full
            masks; a leading 1 instead of B shares the mask across the batch.
    """

    def __init__(self, mask: Tensor):
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"MRI: mask must be (B, 1, 1, W) or (B, 1, H, W), got {tuple(mask.shape)}")
        self.mask = mask if mask.is_floating_point() else mask.to(torch.get_default_dtype())

    @classmethod
    def random(cls, shape: tuple[int, ...], acceleration: float = 4, center_fraction: float | None = None,
               generator: torch.Generator | None = None, per_sample: bool = True, device=None,
               dtype=torch.float32) -> "MRI":
        """Random column masks for images of ``shape`` (B, C, H, W), fastMRI-style.

        A centre band of round(W * center_fraction) columns (at least 1, containing the zero
        frequency) is always sampled; the remaining columns are drawn uniformly without
        replacement so that round(W / acceleration) columns are sampled in all (fastMRI draws
        them as Bernoulli trials with that expected count; the exact count keeps the
        acceleration exact on small images). ``center_fraction`` defaults to 0.08 for 4x and
        0.04 for 8x (0.32 / acceleration). ``per_sample=False`` gives one mask for the batch.
        """
        if len(shape) != 4:
            raise ValueError(f"MRI.random: shape must be (B, C, H, W), got {tuple(shape)}")
        if not acceleration >= 1:
            raise ValueError(f"MRI.random: acceleration must be >= 1, got {acceleration}")
        B, W = shape[0], shape[-1]
        cf = _center_fraction(acceleration) if center_fraction is None else float(center_fraction)
        n_low = min(W, max(1, round(W * cf)))
        n_total = min(W, max(n_low, round(W / acceleration)))
        start = (W - n_low + 1) // 2  # fastMRI's placement: the band covers column W//2 (zero frequency)
        n_masks = B if per_sample else 1
        scores = torch.rand((n_masks, W), generator=generator, device=device, dtype=torch.float64)
        scores[:, start:start + n_low] = float("inf")  # the band is always among the top-k
        keep = scores.topk(n_total, dim=1).indices
        mask = torch.zeros(n_masks, W, device=scores.device, dtype=dtype).scatter_(1, keep, 1.0)
        return cls(mask[:, None, None, :])

    def _mask_for(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        if self.mask.shape[-1] != W or self.mask.shape[-2] not in (1, H):
            raise ValueError(f"MRI: the mask is {tuple(self.mask.shape[-2:])} but k-space is {(H, W)}; draw the "
                             f"mask for the image size (MRI.random(x.shape, ...))")
        if self.mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"MRI holds {self.mask.shape[0]} masks for a batch of {x.shape[0]}")
        return self.mask.to(device=x.device, dtype=x.dtype)

    def A(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.is_complex():
            raise ValueError(f"MRI expects real images (B, C, H, W), got {tuple(x.shape)} {x.dtype}")
        m = self._mask_for(x)
        k = torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=_FFT_DIMS)
        return torch.cat([m * k.real, m * k.imag], dim=1)

    def A_adjoint(self, y: Tensor) -> Tensor:
        if y.dim() != 4 or y.shape[1] % 2:
            raise ValueError(f"MRI: k-space must be (B, 2C, H, W) with [real, imag] channels, got {tuple(y.shape)}")
        C = y.shape[1] // 2
        m = self._mask_for(y)
        k = torch.complex(m * y[:, :C], m * y[:, C:])
        return torch.fft.ifft2(torch.fft.ifftshift(k, dim=_FFT_DIMS), norm="ortho").real

    def init(self, y: Tensor) -> Tensor:
        """The zero-filled reconstruction A^T y (Guan et al. [3] initialise MRI with the adjoint)."""
        return self.A_adjoint(y)

    def symmetric_multiplier(self, dtype, device) -> Tensor:
        """M_sym = (M(k) + M(-k)) / 2 in the UNshifted FFT layout, (B|1, 1, 1|H, W):
        A^T A = F^* M_sym F on real images."""
        m = torch.fft.ifftshift(self.mask.to(device=device, dtype=dtype), dim=_FFT_DIMS)
        # k -> -k (mod N) is a flip followed by a roll of one, on each axis (trivial on a size-1 axis)
        mirror = torch.roll(torch.flip(m, dims=_FFT_DIMS), shifts=(1, 1), dims=_FFT_DIMS)
        return 0.5 * (m + mirror)

    def _power_iteration(self, shape, dtype, device, n_iter: int) -> Tensor:
        """A^T A is diagonal in the Fourier basis with M_sym, so lambda_max = max M_sym per sample."""
        if self.mask.shape[0] not in (1, shape[0]):
            raise ValueError(f"MRI holds {self.mask.shape[0]} masks for a batch of {shape[0]}")
        return self.symmetric_multiplier(dtype, device).flatten(1).amax(1).expand(shape[0]).clone()

    def prox_is_closed_form(self) -> bool:
        return True

    def prox_data(self, v: Tensor, rho, y: Tensor, n_iter: int = 100, tol: float = 1e-6) -> Tensor:
        """(A^T A + rho I)^{-1}(A^T y + rho v) = F^* (M_sym + rho)^{-1} F (A^T y + rho v), exact."""
        rho_b = _per_sample(rho, v)
        self._mask_for(v)
        m_sym = self.symmetric_multiplier(v.dtype, v.device)
        r = self.A_adjoint(y) + rho_b * v
        return torch.fft.ifft2(torch.fft.fft2(r, norm="ortho") / (m_sym + rho_b), norm="ortho").real
