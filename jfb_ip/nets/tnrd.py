"""A trainable reaction-diffusion regulariser (Chen & Pock [13]; the fields-of-experts family): the gradient of a
learned energy, started as smoothed anisotropic total variation."""
from __future__ import annotations

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

        phi_k(z) = a_k z / sqrt(z^2 + eps^2) + s_k(z),

    a smoothed sign (the influence of |z|_eps) plus a learned piecewise-linear function s_k with values v_kj at
    ``n_knots`` knots evenly spaced over [-knot_range, knot_range], constant beyond them. [13] §3.2 mixes Gaussian
    radial basis functions there; the linear interpolant spans the same shapes at O(1) per pixel instead of
    O(n_rbf) (a 33-RBF mixture made one application of R 30x slower than the default DnCNN on CPU). Its potential is
    rho_k(z) = a_k (sqrt(z^2 + eps^2) - eps) + the integral of s_k from the first knot, piecewise quadratic
    (:meth:`energy`).

    Initialisation (TV): the first 2C filters are the forward differences of each channel (vertical, horizontal)
    with a_k = ``weight``, the others random zero-mean filters of unit norm with a_k = 0, and every v = 0. The
    untrained R is then ``weight`` times the gradient of the smoothed anisotropic TV, sum |dx|_eps + |dy|_eps, so a
    fixed point built on it starts at that TV solution and training adds to it. About 10^4 parameters at the
    defaults (48 filters 7x7 over 3 channels, 33 knots each).

    Args:
        channels: image channels C.
        n_filters: number of filters (>= 2 C, the TV filters).
        kernel_size: odd filter side.
        n_knots: knots of each piecewise-linear part.
        knot_range: the knots span [-knot_range, knot_range] (filter responses of images in [0, 1]).
        weight: the TV weight a_k of the difference filters at initialisation (and the unit a and v are stored in).
        eps: the smoothing of |z| in the smoothed sign.
        padding: 'circular' (matches the circular blur: no border) or 'zeros'; R is the exact gradient of E with
            either, because K^T is the adjoint of the padded convolution.
        seed: the random filters' seed (the initialisation does not depend on the global RNG).
    """

    #: DE-GRAD reads this: the output is a regulariser gradient S(x), not a denoised image N(x)
    gradient_form = True

    def __init__(self, channels: int = 3, n_filters: int = 48, kernel_size: int = 7, n_knots: int = 33,
                 knot_range: float = 0.5, weight: float = 1e-3, eps: float = 0.03, padding: str = "circular",
                 seed: int = 0):
        super().__init__()
        if n_filters < 2 * channels:
            raise ValueError(f"TNRD: n_filters must be >= 2 x channels = {2 * channels} (the TV filters), "
                             f"got {n_filters}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"TNRD: kernel_size must be odd and >= 3, got {kernel_size}")
        if n_knots < 2 or not knot_range > 0:
            raise ValueError(f"TNRD: need n_knots >= 2 and knot_range > 0, got {n_knots}, {knot_range}")
        if not (eps > 0 and weight > 0):
            raise ValueError(f"TNRD: eps and weight must be > 0, got {eps!r}, {weight!r}")
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
        # a and v are stored in units of ``weight``: an optimizer's step (Adam's is ~lr whatever the gradient's
        # scale) then moves them relative to the TV weight, not by lr in absolute terms (lr 1e-3 against a 1e-3 weight)
        self.weight = float(weight)
        a = torch.zeros(n_filters)
        a[:2 * c] = 1.0
        self.sign_gain = nn.Parameter(a)
        self.knot_gain = nn.Parameter(torch.zeros(n_filters, n_knots))
        self.knot0, self.knot_step, self.n_knots = -float(knot_range), 2 * float(knot_range) / (n_knots - 1), n_knots

    @property
    def sign_weight(self) -> Tensor:
        """a_k, the smoothed sign's weights."""
        return self.weight * self.sign_gain

    @property
    def knot_values(self) -> Tensor:
        """v_kj, the piecewise-linear part's values at the knots."""
        return self.weight * self.knot_gain

    def kernels(self) -> Tensor:
        """The zero-mean filters K_k (the mean over channels and taps removed: constants carry no energy)."""
        return self.filters - self.filters.mean((1, 2, 3), keepdim=True)

    def responses(self, x: Tensor) -> Tensor:
        """K_k x for every k: (B, C, H, W) -> (B, n_filters, H, W)."""
        p = self.kernel_size // 2
        if self.padding == "circular":
            return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), self.kernels())
        return F.conv2d(x, self.kernels(), padding=p)

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

    def _cell(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For responses z: the clamped zc, the flat table index of each cell's left knot, the position t in [0, 1]
        inside the cell, and the table (n_filters * n_knots,) of knot values."""
        hi = self.knot0 + (self.n_knots - 1) * self.knot_step
        zc = z.clamp(self.knot0, hi)
        u = (zc - self.knot0) / self.knot_step
        j = u.detach().floor().clamp(max=self.n_knots - 2)
        t = u - j
        offset = torch.arange(z.shape[1], device=z.device)[:, None, None] * self.n_knots
        return zc, j.long() + offset, t, self.knot_values.flatten()

    def influence(self, z: Tensor) -> Tensor:
        """phi_k(z) for responses z of shape (B, n_filters, H, W)."""
        _, idx, t, v = self._cell(z)
        v0, v1 = v.take(idx), v.take(idx + 1)
        a = self.sign_weight[:, None, None]
        return a * z * torch.rsqrt(z.square() + self.eps ** 2) + v0 + (v1 - v0) * t

    def forward(self, x: Tensor) -> Tensor:
        """R(x) = sum_k K_k^T phi_k(K_k x) = grad E(x)."""
        return self.adjoint(self.influence(self.responses(x)))

    def energy(self, x: Tensor) -> Tensor:
        """E(x) per sample, the potential whose gradient :meth:`forward` is."""
        z = self.responses(x)
        zc, idx, t, v = self._cell(z)
        vk = self.knot_values
        # the integral of the interpolant from the first knot to each knot (the trapezoid rule is exact on it)
        cum = F.pad(torch.cumsum(0.5 * self.knot_step * (vk[:, 1:] + vk[:, :-1]), 1), (1, 0)).flatten()
        v0, v1 = v.take(idx), v.take(idx + 1)
        spline = cum.take(idx) + self.knot_step * (v0 * t + 0.5 * (v1 - v0) * t.square())
        spline = spline + (z - zc) * (v0 + (v1 - v0) * t)  # linear beyond the knots, where s_k is constant
        a = self.sign_weight[:, None, None]
        return (a * ((z.square() + self.eps ** 2).sqrt() - self.eps) + spline).flatten(1).sum(1)

    def curvature(self, grid: int = 64) -> Tensor:
        """An upper bound on Lip(R), up to the frequency grid: R's Jacobian is K^T D K with D = diag(phi_k'(K_k x)),
        |phi_k'| <= l_k = |a_k| / eps + max_j |v_k,j+1 - v_kj| / h (h the knot spacing), so
        ||J|| <= lambda_max(sum_k l_k K_k^T K_k), the largest over frequencies of the C x C matrices
        sum_k l_k K_k(w) K_k(w)^H (sampled on a ``grid`` x ``grid`` DFT grid). At the TV initialisation it is
        8 ``weight`` / eps, the smoothed TV's own bound. Detached: it sets a step size, not a trained quantity."""
        with torch.no_grad():
            v = self.knot_values
            lip = self.sign_weight.abs() / self.eps + (v[:, 1:] - v[:, :-1]).abs().amax(1) / self.knot_step
            kh = torch.fft.fft2(self.kernels(), s=(grid, grid))  # (n, C, g, g)
            m = torch.einsum("kcuv,k,kduv->uvcd", kh, lip.to(kh.dtype), kh.conj())
            return torch.linalg.eigvalsh(m).amax()
