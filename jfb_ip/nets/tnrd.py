"""A trainable reaction-diffusion regulariser (Chen & Pock [13]; the fields-of-experts family): the gradient of a
learned energy, started as smoothed anisotropic total variation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PADDINGS = ("circular", "zeros")


class TNRD(nn.Module):
    """R(x) = sum_k K_k^T phi_k(K_k x), the gradient of the energy E(x) = sum_k sum_pixels rho_k((K_k x)_p).

    The diffusion term of one stage of Chen & Pock's [13] trainable nonlinear reaction diffusion (their eq. (6)),
    used here as the learned regulariser of a fixed point (DE-GRAD's S(x), which wants a gradient): K_k are
    ``n_filters`` learned zero-mean ``kernel_size`` x ``kernel_size`` filters over all image channels, and each
    influence function phi_k = rho_k' is

        phi_k(z) = a_k z / sqrt(z^2 + eps^2) + sum_j w_kj exp(-(z - mu_j)^2 / (2 s^2)),

    a smoothed sign (the influence of |z|_eps) plus the Gaussian radial-basis mixture of [13] §3.2 on ``n_rbf``
    centers mu_j evenly spaced over [-rbf_range, rbf_range] with width s = their spacing. Its potential is
    rho_k(z) = a_k (sqrt(z^2 + eps^2) - eps) + sum_j w_kj s sqrt(pi/2) erf((z - mu_j) / (sqrt(2) s)) (:meth:`energy`).

    Initialisation (TV): the first 2C filters are the forward differences of each channel (vertical, horizontal)
    with a_k = ``weight``, the others random zero-mean filters of unit norm with a_k = 0, and every w = 0. The
    untrained R is then ``weight`` times the gradient of the smoothed anisotropic TV, sum |dx|_eps + |dy|_eps, so a
    fixed point built on it starts at that TV solution and training adds to it. About 10^4 parameters at the
    defaults (48 filters 7x7 over 3 channels, 33 RBFs each).

    Args:
        channels: image channels C.
        n_filters: number of filters (>= 2 C, the TV filters).
        kernel_size: odd filter side.
        n_rbf: Gaussian RBFs per influence function.
        rbf_range: the RBF centers span [-rbf_range, rbf_range] (filter responses of images in [0, 1]).
        weight: the TV weight a_k of the difference filters at initialisation.
        eps: the smoothing of |z| in the smoothed sign.
        padding: 'circular' (matches the circular blur: no border) or 'zeros'; R is the exact gradient of E with
            either, because K^T is the adjoint of the padded convolution.
        seed: the random filters' seed (the initialisation does not depend on the global RNG).
    """

    #: DE-GRAD reads this: the output is a regulariser gradient S(x), not a denoised image N(x)
    gradient_form = True

    def __init__(self, channels: int = 3, n_filters: int = 48, kernel_size: int = 7, n_rbf: int = 33,
                 rbf_range: float = 0.5, weight: float = 1e-3, eps: float = 0.03, padding: str = "circular",
                 seed: int = 0):
        super().__init__()
        if n_filters < 2 * channels:
            raise ValueError(f"TNRD: n_filters must be >= 2 x channels = {2 * channels} (the TV filters), "
                             f"got {n_filters}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"TNRD: kernel_size must be odd and >= 3, got {kernel_size}")
        if n_rbf < 2 or not rbf_range > 0:
            raise ValueError(f"TNRD: need n_rbf >= 2 and rbf_range > 0, got {n_rbf}, {rbf_range}")
        if not eps > 0:
            raise ValueError(f"TNRD: eps must be > 0, got {eps!r}")
        if padding not in PADDINGS:
            raise ValueError(f"TNRD: padding must be one of {PADDINGS}, got {padding!r}")
        self.channels, self.kernel_size, self.eps, self.padding = channels, kernel_size, float(eps), padding
        k, c, p = kernel_size, channels, kernel_size // 2
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n_filters, c, k, k, generator=g)
        w = w - w.mean((1, 2, 3), keepdim=True)
        w = w / w.flatten(1).norm(dim=1)[:, None, None, None]
        for ch in range(c):  # forward differences: (Kx)(i, j) = x(i+1, j) - x(i, j), and along j
            for d, (dy, dx) in enumerate(((1, 0), (0, 1))):
                f = torch.zeros(c, k, k)
                f[ch, p, p], f[ch, p + dy, p + dx] = -1.0, 1.0
                w[2 * ch + d] = f
        self.filters = nn.Parameter(w)
        a = torch.zeros(n_filters)
        a[:2 * c] = weight
        self.sign_weight = nn.Parameter(a)
        self.rbf_weight = nn.Parameter(torch.zeros(n_filters, n_rbf))
        self.register_buffer("centers", torch.linspace(-rbf_range, rbf_range, n_rbf))
        self.rbf_width = 2 * rbf_range / (n_rbf - 1)

    def kernels(self) -> Tensor:
        """The zero-mean filters K_k (the mean over channels and taps removed: constants carry no energy)."""
        return self.filters - self.filters.mean((1, 2, 3), keepdim=True)

    def _pad(self, x: Tensor) -> Tensor:
        p = self.kernel_size // 2
        return F.pad(x, (p, p, p, p), mode="circular") if self.padding == "circular" else x

    def responses(self, x: Tensor) -> Tensor:
        """K_k x for every k: (B, C, H, W) -> (B, n_filters, H, W)."""
        return F.conv2d(self._pad(x), self.kernels(), padding=0 if self.padding == "circular" else self.kernel_size // 2)

    def adjoint(self, u: Tensor) -> Tensor:
        """sum_k K_k^T u_k, the adjoint of :meth:`responses`."""
        p = self.kernel_size // 2
        if self.padding == "zeros":
            return F.conv_transpose2d(u, self.kernels(), padding=p)
        v = F.conv_transpose2d(u, self.kernels())  # (B, C, H + 2p, W + 2p): fold the circular padding back
        H, W = u.shape[-2:]
        out = v[..., p:p + H, p:p + W].clone()
        out[..., -p:, :] += v[..., :p, p:p + W]
        out[..., :p, :] += v[..., -p:, p:p + W]
        out[..., :, -p:] += v[..., p:p + H, :p]
        out[..., :, :p] += v[..., p:p + H, -p:]
        out[..., -p:, -p:] += v[..., :p, :p]
        out[..., -p:, :p] += v[..., :p, -p:]
        out[..., :p, -p:] += v[..., -p:, :p]
        out[..., :p, :p] += v[..., -p:, -p:]
        return out

    def _gauss(self, z: Tensor) -> Tensor:
        return torch.exp(-(z.unsqueeze(-1) - self.centers).square() / (2 * self.rbf_width ** 2))

    def influence(self, z: Tensor) -> Tensor:
        """phi_k(z) for responses z of shape (B, n_filters, H, W)."""
        a = self.sign_weight[:, None, None]
        rbf = torch.einsum("bkhwj,kj->bkhw", self._gauss(z), self.rbf_weight)
        return a * z * torch.rsqrt(z.square() + self.eps ** 2) + rbf

    def forward(self, x: Tensor) -> Tensor:
        """R(x) = sum_k K_k^T phi_k(K_k x) = grad E(x)."""
        return self.adjoint(self.influence(self.responses(x)))

    def energy(self, x: Tensor) -> Tensor:
        """E(x) per sample, the potential whose gradient :meth:`forward` is."""
        z = self.responses(x)
        a = self.sign_weight[:, None, None]
        s = self.rbf_width
        erf = torch.erf((z.unsqueeze(-1) - self.centers) / (math.sqrt(2) * s))
        rbf = s * math.sqrt(math.pi / 2) * torch.einsum("bkhwj,kj->bkhw", erf, self.rbf_weight)
        return (a * ((z.square() + self.eps ** 2).sqrt() - self.eps) + rbf).flatten(1).sum(1)

    def curvature(self, grid: int = 64) -> Tensor:
        """An upper bound on Lip(R), up to the frequency grid: R's Jacobian is K^T D K with D = diag(phi_k'(K_k x)),
        |phi_k'| <= l_k = |a_k| / eps + sum_j |w_kj| / (s sqrt(e)), so ||J|| <= lambda_max(sum_k l_k K_k^T K_k),
        the largest over frequencies of the C x C matrices sum_k l_k K_k(w) K_k(w)^H (sampled on a ``grid`` x
        ``grid`` DFT grid). At the TV initialisation it is 8 ``weight`` / eps, the smoothed TV's own bound. Detached:
        it sets a step size, not a trained quantity."""
        with torch.no_grad():
            lip = self.sign_weight.abs() / self.eps + self.rbf_weight.abs().sum(1) / (self.rbf_width * math.sqrt(math.e))
            kh = torch.fft.fft2(self.kernels(), s=(grid, grid))  # (n, C, g, g)
            m = torch.einsum("kcuv,k,kduv->uvcd", kh, lip.to(kh.dtype), kh.conj())
            return torch.linalg.eigvalsh(m).amax()
