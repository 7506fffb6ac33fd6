"""The shallow equilibrium proximal block of LUSER (Guan et al. [3], Fig. 1, eq. 7, Table 1)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .dncnn import NORM_MODES, lipschitz_conv
from .inplace_norm import GroupNormLeakyReLU


def _conv(cin: int, cout: int, gamma: float, mode: str = "kernel") -> nn.Conv2d:
    return lipschitz_conv(nn.Conv2d(cin, cout, 3, padding=1, bias=True), gamma, mode)


class LUSERBlock(nn.Module):
    """Injection, data and mixing layers of Table 1 of Guan et al. [3], for C image channels.

    Injection: SN conv C->32, LeakyReLU, SN conv 32->32, LeakyReLU (applied once to d_k).
    Data:      SN conv C->32, GN, LeakyReLU, SN conv 32->32, GN, LeakyReLU (applied to r).
    Mixing:    SN conv 64->64, GN, LeakyReLU, SN conv 64->64, GN, LeakyReLU, SN conv 64->C.
    The recursive map is r -> Mix(Data(r) (+) Inj(d_k)) (eq. 7); its fixed point r* is the
    residual added to d_k. Convolutions have biases and GroupNorm is affine, which gives
    Table 3's parameter counts (93,953 per block for C = 1).

    Convergence (``norm_eps``): GroupNorm divides by sqrt(var + eps). With torch's eps = 1e-5 and
    r near 0 (the solve starts at r = 0) the group variance is tiny, the map's local Lipschitz
    constant is 16 to 41 and no inner solve reached tol = 1e-3 within 30 Anderson iterations at
    initialisation (0 of 64 stage-solves, residuals 0.1 to 0.4). Table 1 fixes the layers but not
    GroupNorm's epsilon: with eps = 1 (the default here) the normalisation's gain is at most
    1/sqrt(eps) = 1 wherever the group variance is small, the spectrally normalised convs and
    LeakyReLUs keep the rest near 1-Lipschitz, and every stage-solve converged at initialisation
    (64 of 64, about 3 Anderson iterations each; 8 natural 48x48 crops, deblurring).

    What is guaranteed (``norm_mode``, ``max_norm_gain``): GroupNorm's Jacobian is
    diag(w) / sqrt(var + eps) times a projection, so its gain is at most max|w| / sqrt(eps).
    With ``norm_mode="kernel"`` (the default; Guan et al.'s [3] spectral norm of the reshaped kernel) a
    3x3 conv may still exceed gamma by up to 3x and the affine weights w are free, so nothing bounds
    the map: it is non-expansive at initialisation only. With ``norm_mode="operator"`` the five
    recurrent convs (data and mixing) have operator norm gamma at their input size
    (:class:`ConvOperatorNorm`) and, with ``max_norm_gain`` = g, every GroupNorm weight is clamped
    to [-g, g]; then Lip(r -> step(r)) <= gamma^5 (g / sqrt(eps))^4, a contraction when that is < 1
    (gamma = 0.99, g = sqrt(eps): 0.951). The injection convs act on d_k once, outside the
    recursion, so they keep the kernel normalisation. The parameter count is unchanged.

    Memory (same function, fewer tensors kept for backward): LeakyReLUs act in place; each
    GroupNorm + LeakyReLU pair keeps only its output (:class:`GroupNormLeakyReLU`, InPlace-ABN
    style); the first mixing conv applies the two halves of its (jointly spectrally
    normalised) kernel to Data(r) and Inj(d) and sums them, which equals the conv of the
    concatenation without storing a concatenated copy.
    """

    def __init__(self, channels: int = 3, width: int = 32, groups: int = 8, gamma: float = 1.0,
                 negative_slope: float = 0.01, norm_eps: float = 1.0, norm_mode: str = "kernel",
                 max_norm_gain: float | None = None):
        super().__init__()
        if not norm_eps > 0:
            raise ValueError(f"LUSERBlock: norm_eps must be > 0, got {norm_eps!r}")
        if norm_mode not in NORM_MODES:
            raise ValueError(f"LUSERBlock: norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")
        if max_norm_gain is not None and not max_norm_gain > 0:
            raise ValueError(f"LUSERBlock: max_norm_gain must be > 0 or null, got {max_norm_gain!r}")
        act = lambda: nn.LeakyReLU(negative_slope, inplace=True)  # noqa: E731
        self.width = width
        w2 = 2 * width
        self.injection = nn.Sequential(_conv(channels, width, gamma), act(), _conv(width, width, gamma), act())
        norm_act = lambda c: GroupNormLeakyReLU(groups, c, negative_slope, norm_eps, max_norm_gain)  # noqa: E731
        rec = lambda cin, cout: _conv(cin, cout, gamma, norm_mode)  # noqa: E731  (the recursion's convs)
        self.data = nn.Sequential(rec(channels, width), norm_act(width), rec(width, width), norm_act(width))
        self.mixing = nn.Sequential(rec(w2, w2), norm_act(w2), rec(w2, w2), norm_act(w2), rec(w2, channels))
        # step() reads mixing[0]'s weight without calling the module, so its input-size hook never fires
        self._mix_norm = first_norm(self.mixing[0]) if norm_mode == "operator" else None

    def inject(self, d: Tensor) -> Tensor:
        return self.injection(d)

    def step(self, r: Tensor, injected: Tensor) -> Tensor:
        """One application of the recursive part: Mix(Data(r) (+) Inj(d))."""
        first = self.mixing[0]
        if self._mix_norm is not None:
            self._mix_norm.size = tuple(r.shape[-2:])
        w = first.weight
        h = F.conv2d(self.data(r), w[:, : self.width], first.bias, padding=1) + \
            F.conv2d(injected, w[:, self.width:], None, padding=1)
        return self.mixing[1:](h)


def first_norm(conv: nn.Conv2d):
    """The (first) weight parametrization of a conv: its ConvOperatorNorm in operator mode."""
    return conv.parametrizations.weight[0]
