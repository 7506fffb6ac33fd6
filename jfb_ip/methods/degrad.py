"""DE-GRAD: the deep-equilibrium gradient-descent map of papers 000/001."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..physics import Measurement, MixedMeasurement
from ..linalg import per_sample
from ..solvers import equilibrium
from .base import FixedPointMethod, Reconstruction
from .classical import Wiener
from .tv import TV, divergence, gradient

# With a gradient-form prior (``tv_prior``, a gradient-form net) the data prox is taken at
# rho = L (lam + STEP_CURVATURE c), c a bound on the prior's curvature (8 alpha / eps for smoothed TV): the
# forward-backward step 1/rho is then 4 / c, twice the 2 / c that guarantees descent, which the bound's slack (it is
# reached only by a checkerboard in a flat region) and Anderson's mixing absorb. Measured on the validation crops
# (deblur, eps 0.03): 12 Anderson iterations to 1e-3 at 0.25 and the minimiser's PSNR within 0.02 dB; 9 at 0.5 but
# 0.1 dB short (the relative residual shrinks with the step, so a short step stops early).
STEP_CURVATURE = 0.25


def smoothed_tv(x: Tensor, eps: float) -> Tensor:
    """TV_eps(x) = sum over pixels and channels of sqrt(|grad x|^2 + eps^2) - eps, per sample: the isotropic TV of
    :func:`~jfb_ip.methods.tv.tv_norm` (Rudin, Osher, Fatemi [10]) with its kink at 0 rounded off over ``eps``."""
    return ((gradient(x).square().sum(2) + eps ** 2).sqrt() - eps).flatten(1).sum(1)


def smoothed_tv_gradient(x: Tensor, eps: float) -> Tensor:
    """grad TV_eps(x) = -div(grad x / sqrt(|grad x|^2 + eps^2)) (:func:`smoothed_tv`'s gradient; Lipschitz with
    constant at most ||grad||^2 / eps = 8 / eps)."""
    g = gradient(x)
    return -divergence(g * torch.rsqrt(g.square().sum(2, keepdim=True) + eps ** 2))


def smoothed_tv_solve(meas: Measurement, alpha: float, eps: float, tol: float = 1e-3, max_iter: int = 100,
                      prox: bool = True, x0: Tensor | None = None) -> Tensor:
    """argmin_x 1/2 ||Ax - y||^2 + alpha L TV_eps(x) (L = ||A||^2, so ``alpha`` is TV's relative weight), the
    equilibrium of the forward-backward map x -> prox_data(x - (alpha L / rho) grad TV_eps(x), rho) with
    rho = STEP_CURVATURE 8 alpha L / eps (``prox``; a gradient step x - (grad f + alpha L grad TV_eps) / (L + rho)
    otherwise), by Anderson acceleration from ``x0`` (the task's initializer). No grad: an initializer."""
    with torch.no_grad():
        z0 = meas.init() if x0 is None else x0
        L = per_sample(meas.lambda_max(), z0)
        rho = STEP_CURVATURE * 8 * alpha * L / eps
        if prox:
            f = lambda x: meas.prox_data(x - alpha * L / rho * smoothed_tv_gradient(x, eps), rho)  # noqa: E731
        else:
            f = lambda x: x - (meas.grad(x) + alpha * L * smoothed_tv_gradient(x, eps)) / (L + rho)  # noqa: E731
        x, _ = equilibrium(f, z0, forward="anderson", backward="jfb", tol=tol, max_iter=max_iter, m=5, lam=1e-4)
        return x


class DEGRAD(FixedPointMethod):
    """Fixed point of T(x) = x - eta * (A^T(Ax - d) + S(x)), eq. (3.5)-(3.6) of Liu et al. [1].

    The learned term is S(x) = lam * (x - N(x)) with N the network (a denoiser-like map with
    a Lipschitz constant eps < 1 when spectral normalisation is on) and lam in (0, 1) a
    learned weight. Then S - lam*I is lam*eps-Lipschitz and, for eta <= 1/(L + 1),
    Theorem 3.1 of Liu et al. [1] (with the data term scaled by 1/lam) gives the contraction
    factor gamma = 1 - eta * lam * (1 - eps) < 1, whatever the blur's smallest eigenvalue.
    At lam -> 0 the fixed point is the least-squares solution; N(x) = 0 gives Tikhonov.

    ``data_step="prox"`` reaches the same equilibrium with another map. The fixed points of eq. (3.6),
    A^T(Ax - d) + lam (x - N(x)) = 0, are exactly those of

        T_prox(x) = (A^T A + lam I)^{-1} (A^T d + lam N(x))      (the data term's prox at N(x)),

    a half-quadratic-splitting step. Where A^T A has a null space (dropped pixels, the high frequencies
    SR removes, unsampled k-space) eq. (3.6) moves x by only eta lam (x - N(x)) per step, so its
    relative residual is small long before x is near the equilibrium, and JFB's one step carries the same
    factor; T_prox moves x to N(x) there (Lip(T_prox) <= Lip(N)), so the residual measures the distance
    and JFB's step is the network's own. Closed form for blur (circular), inpainting, SR and MRI;
    conjugate gradient for CT.

    ``inject="input"`` gives the network the initializer z0 = meas.init() as extra input channels (input
    injection, as in Bai et al.'s DEQs and the injection layer of Guan et al.'s [3] LUSER block): N(x) becomes
    net([x, z0]); ``inject="anchor"`` also adds z0 to the output, N(x) = z0 + tanh(g) net([x, z0]), so the
    network learns a correction of the initializer instead of reproducing the image through its layers. The
    gate g is learned from 0 (ReZero, Bachlechner et al. 2021): the untrained model's equilibrium is then the
    data term's prox at z0 itself, not z0 plus a random network's output, and |tanh g| < 1 keeps Lip(N) below
    Lip(net). The maps and equilibrium equations above are unchanged with N(x) read as N([x, z0]); the
    contraction argument is in x alone, so nothing about it changes either. Why: where A^T A has a null
    space the equilibrium there is x = N(x); without z0 the network must hold 80% of an image's pixels as
    its own fixed point from x alone, with z0 it can anchor them to the classical estimate and learn the
    correction (docs/methods.md, "DE-GRAD").

    ``initializer="wiener"`` replaces the task's initializer by the Tikhonov/Wiener estimate
    (:class:`~jfb_ip.methods.Wiener`, gradient prior) as z0, the solve's start and what ``inject`` feeds the
    network. Its weight is chosen on the first training batch (``ReconstructionModule``), then fixed, so the map
    being trained does not change under it; it travels in the checkpoint.

    Args:
        net: the network N (e.g. :class:`jfb_ip.nets.DnCNN`).
        eta: step size; None derives 1/(L + 1) per sample from L = lambda_max(A^T A).
        reg_weight: initial lam.
        data_step: ``"gradient"`` (eq. (3.6)), ``"prox"`` (T_prox above; ``eta`` unused) or ``"auto"``: prox where
            the operator's data prox is a closed form (``prox_is_closed_form``: circular blur, inpainting, SR, MRI,
            denoising), gradient elsewhere (CT, zero-padded blur), where T_prox would run a conjugate-gradient solve
            at every application of T and its map would only be as exact as that solve (as ``tv``'s ``auto``).
        inject: ``"none"``, ``"input"`` or ``"anchor"`` (above); with injection the network takes 2 x the image
            channels in and gives the image channels out.
        initializer: z0: ``"task"`` (the task's initializer, ``meas.init()``) or ``"wiener"`` (above).
        reg_relative: weigh the prior relative to the data term's scale L = ||A||^2: S(x) = lam L (x - N(x)), the
            prox at lam L, and eta = 1/(2L) when not given. At L = 1 (blur, inpainting, MRI) this is Liu et al.'s [1]
            map exactly; it makes the map invariant to a rescaling of A, so lam in (0, 1) suits every operator
            (CT's ||A||^2 is in the hundreds: with an absolute lam the prior weighs nothing beside the data
            there; SR's is 1/f^2), as the Wiener baseline's weight is relative to ||A||^2.
        learn_reg_weight: train lam with the network.
        log_lipschitz: measure the local Lipschitz constants of N and T on the first validation
            batch of every validation epoch (:meth:`FixedPointMethod.lipschitz_estimates`).
        contraction_penalty, contraction_target, contraction_iters: the training-time penalty on Lip(T) above the
            target at the fixed points (:meth:`FixedPointMethod.contraction_term`; 0: off).
        gate_init: the anchor gate's starting value g (``inject="anchor"`` only). 0 (ReZero) starts from the data
            term's prox at z0, but the network's weights get no gradient until g has moved, and when the gate opens
            can depend on round-off (sr4: step ~255 in one run, ~450 in another). A small nonzero g starts the
            network learning at step 0; measured, it raised validation PSNR early but not the test numbers beyond
            the seed spread (docs/results.md, "What did not help").
        tv_prior: the gradient-form regulariser S(x) = alpha L grad TV_eps(x) + learned part (class docstring, "TV
            prior"); alpha = ``tv_weight`` at the start, learned (log-parametrised) with ``learn_tv_weight``.
        tv_weight, tv_eps: TV's weight alpha relative to L (TV's validation weight: ``method=tv``'s lam) and the
            smoothing eps of TV_eps, for ``tv_prior`` and the ``tv`` / ``smooth_tv`` initializers.
        initializer_tol, initializer_max_iter: the stopping rule of the ``tv`` / ``smooth_tv`` initializers' solves.
        solver, backward: equilibrium options (see :class:`FixedPointMethod`).

    **TV prior** (``tv_prior=True``) and **gradient-form nets** (a net with ``gradient_form = True``, such as
    :class:`~jfb_ip.nets.TNRD`, whose output is a regulariser gradient): the regulariser is written as a gradient,

        S(x) = L (alpha grad TV_eps(x) + tanh(g) R(x))      (gradient-form net R; without ``tv_prior``: L R(x))
        S(x) = L alpha grad TV_eps(x) + rho tanh(g) (x - net(.))  (any other net, ``tv_prior`` only),

    and eq. (3.6)'s equilibrium A^T(Ax - d) + S(x) = 0 is reached with N(x) = x - S(x) / rho, the prox map then being
    the forward-backward step prox_data(x - S(x) / rho, rho), at rho = L (lam + STEP_CURVATURE c), c the prior's
    curvature bound (8 alpha / eps for TV_eps; :meth:`TNRD.curvature`). The gate g starts at ``gate_init`` (0), so
    the untrained equilibrium is argmin 1/2 ||Ax - d||^2 + alpha L TV_eps(x), the smoothed TV solution, whatever the
    network: training can only add to the classical method. The denoiser-form net sees x (``inject="none"``) or
    [x, z0] (``inject="input"``); ``anchor`` is refused (the TV step takes the anchor's place). Its part is DE-GRAD's
    own regulariser rho (x - net) gated, N(x) = x - S_TV(x) / rho + t (net(.) - x) with t = tanh(g): where A^T A
    vanishes (the blur's high frequencies) Lip(N) is then at most (1 - t) + t Lip(net), where an additive correction
    x - S_TV(x) / rho + t net(.) has Lip(N) near 1 + t Lip(net) (measured on deblur: the validation solves stopped
    converging, Lip(T) 1.34 after 128 steps).

    ``initializer="tv"`` starts from TV's solution (Chambolle-Pock, :func:`~jfb_ip.methods.tv.tv_solve`, weight
    ``tv_weight``) and ``"smooth_tv"`` from the smoothed TV solution (:func:`smoothed_tv_solve`, Anderson on the
    forward-backward map: a few iterations where Chambolle-Pock takes a hundred or more).
    """

    DATA_STEPS = ("gradient", "prox", "auto")
    INJECTS = ("none", "input", "anchor")
    INITIALIZERS = ("task", "wiener", "tv", "smooth_tv")

    def __init__(self, net: nn.Module, solver: Mapping[str, Any], backward: Mapping[str, Any],
                 eta: float | None = None, reg_weight: float = 0.05, learn_reg_weight: bool = True,
                 log_lipschitz: bool = True, data_step: str = "gradient", inject: str = "none",
                 initializer: str = "task", reg_relative: bool = False, contraction_penalty: float = 0.0,
                 contraction_target: float = 0.9, contraction_iters: int = 4, gate_init: float = 0.0,
                 tv_prior: bool = False, tv_weight: float = 1e-3, tv_eps: float = 0.03, learn_tv_weight: bool = True,
                 initializer_tol: float = 1e-3, initializer_max_iter: int = 100):
        super().__init__(solver, backward, log_lipschitz, contraction_penalty, contraction_target, contraction_iters)
        if data_step not in self.DATA_STEPS:
            raise ValueError(f"DEGRAD: data_step must be one of {self.DATA_STEPS}, got {data_step!r}")
        if data_step in ("prox", "auto") and eta is not None:
            raise ValueError(f"DEGRAD: data_step={data_step} takes no step size; drop method.eta (or use "
                             f"data_step=gradient)")
        if not 0 < reg_weight < 1:
            raise ValueError(f"DEGRAD: reg_weight must lie in (0, 1), got {reg_weight}")
        if eta is not None and eta <= 0:
            raise ValueError(f"DEGRAD: eta must be > 0 (or null for 1/(L+1)), got {eta}")
        self.net = net
        self.eta = eta
        self.data_step = data_step
        if inject not in self.INJECTS:
            raise ValueError(f"DEGRAD: inject must be one of {self.INJECTS}, got {inject!r}")
        self.inject = inject
        if not math.isfinite(gate_init):
            raise ValueError(f"DEGRAD: gate_init must be a finite number (the anchor gate's starting g), "
                             f"got {gate_init!r}")
        self.tv_prior = bool(tv_prior)
        self.net_gradient_form = bool(getattr(net, "gradient_form", False))
        # S(x) is a gradient (TV_eps's, a gradient-form net's) and T the forward-backward step on it
        self.gradient_form = self.tv_prior or self.net_gradient_form
        if self.net_gradient_form and inject != "none":
            raise ValueError(f"DEGRAD: {type(net).__name__} is a regulariser gradient R(x) of the image alone; "
                             f"inject={inject!r} has nothing to feed it: set method.inject=none")
        if self.tv_prior and inject == "anchor":
            raise ValueError("DEGRAD: with tv_prior the TV step x - alpha L grad TV_eps(x) / rho takes the anchor's "
                             "place: set method.inject=input (the network sees [x, z0]) or none")
        has_gate = inject == "anchor" or self.tv_prior
        if gate_init != 0 and not has_gate:
            raise ValueError(f"DEGRAD: gate_init={gate_init} sets the anchor gate, which only inject=anchor or "
                             f"tv_prior has (got inject={inject!r}): drop method.gate_init or set method.inject=anchor")
        self.anchor_gate = nn.Parameter(torch.tensor(float(gate_init))) if has_gate else None
        if initializer not in self.INITIALIZERS:
            raise ValueError(f"DEGRAD: initializer must be one of {self.INITIALIZERS}, got {initializer!r}")
        for name, v in (("tv_weight", tv_weight), ("tv_eps", tv_eps), ("initializer_tol", initializer_tol)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"DEGRAD: {name} must be a finite number > 0, got {v!r}")
        if int(initializer_max_iter) != initializer_max_iter or initializer_max_iter < 1:
            raise ValueError(f"DEGRAD: initializer_max_iter must be an integer >= 1, got {initializer_max_iter!r}")
        self.initializer = initializer
        self.reg_relative = bool(reg_relative)
        self.wiener = Wiener() if initializer == "wiener" else None
        # TV's weight is given (its validation weight), not searched again: an empty grid keeps it
        self.tv_init = (TV(lam=tv_weight, lambda_grid=[], tol=initializer_tol, max_iter=int(initializer_max_iter))
                        if initializer == "tv" else None)
        self.tv_weight, self.tv_eps = float(tv_weight), float(tv_eps)
        self.initializer_tol, self.initializer_max_iter = float(initializer_tol), int(initializer_max_iter)
        self.tv_log_weight = (nn.Parameter(torch.tensor(math.log(tv_weight)), requires_grad=learn_tv_weight)
                              if self.tv_prior else None)
        logit = torch.tensor(math.log(reg_weight / (1 - reg_weight)))
        self.reg_logit = nn.Parameter(logit, requires_grad=learn_reg_weight)

    @property
    def reg_weight(self) -> Tensor:
        return torch.sigmoid(self.reg_logit)

    @property
    def tv_alpha(self) -> Tensor:
        """alpha, the TV prior's weight (relative to L with ``reg_relative``)."""
        return self.tv_log_weight.exp()

    def prior_curvature(self) -> Tensor | float:
        """A bound on the Lipschitz constant of S / L (gradient form; 0 otherwise): 8 alpha / eps for alpha TV_eps
        plus |tanh g| (or 1) times the gradient-form net's own bound. Detached: it sets the step only."""
        c = 0.0
        with torch.no_grad():
            if self.tv_prior:
                c = c + 8 * self.tv_alpha / self.tv_eps
            if self.net_gradient_form:
                gate = torch.tanh(self.anchor_gate).abs() if self.tv_prior else 1.0
                c = c + gate * self.net.curvature()
        return c

    def prior_scale(self, meas: Measurement, like: Tensor) -> Tensor | float:
        """L per sample with ``reg_relative`` (the gradient-form prior's scale), else 1."""
        return per_sample(meas.lambda_max(), like) if self.reg_relative else 1.0

    def step_size(self, meas: Measurement, like: Tensor) -> Tensor | None:
        """eta per sample; None where T is T_prox (:meth:`uses_prox`), whose map takes no step (and, without
        ``reg_relative``, needs no lambda_max(A^T A), a power iteration per batch)."""
        if self.uses_prox(meas):
            return None
        if self.eta is not None:
            return per_sample(self.eta, like)
        L = meas.lambda_max()
        if self.gradient_form:  # the prior's curvature as well as the data term's (prior_weight)
            return 1.0 / (per_sample(L, like) + self.prior_weight(meas, like))
        return per_sample(1.0 / (2 * L) if self.reg_relative else 1.0 / (L + 1.0), like)

    def uses_prox(self, meas: Measurement) -> bool:
        """Whether T is T_prox for this measurement (``data_step``; ``auto`` asks the operator(s))."""
        if self.data_step != "auto":
            return self.data_step == "prox"
        parts = [m for _, m in meas.parts] if isinstance(meas, MixedMeasurement) else [meas]
        return all(m.physics.prox_is_closed_form() for m in parts)

    def prior_weight(self, meas: Measurement, like: Tensor) -> Tensor:
        """lam, or lam L per sample with ``reg_relative`` (L = lambda_max(A^T A), cached on the operator); with a
        gradient-form prior rho = (lam + STEP_CURVATURE c) (times L), c = :meth:`prior_curvature`."""
        lam = self.reg_weight
        if self.gradient_form:
            lam = lam + STEP_CURVATURE * self.prior_curvature()
        if not self.reg_relative:
            return lam
        return lam * per_sample(meas.lambda_max(), like)

    def gradient_prior(self, x: Tensor, scale: Tensor | float) -> Tensor:
        """The gradient part of S(x): scale (alpha grad TV_eps(x) + tanh(g) R(x)) (class docstring)."""
        s = 0.0
        if self.tv_prior:
            s = self.tv_alpha * smoothed_tv_gradient(x, self.tv_eps)
        if self.net_gradient_form:
            r = self.net(x)
            s = s + (torch.tanh(self.anchor_gate) * r if self.tv_prior else r)
        return scale * s

    def N(self, x: Tensor, z0: Tensor | None, rho: Tensor | None = None, scale: Tensor | float = 1.0) -> Tensor:
        """N(x): net(x), net([x, z0]) or z0 + tanh(g) net([x, z0]) by ``inject``; with a gradient-form prior
        x - S(x) / rho (``rho``: :meth:`prior_weight`, ``scale``: :meth:`prior_scale`; class docstring)."""
        if self.gradient_form:
            out = x - self.gradient_prior(x, scale) / rho
            if self.net_gradient_form:
                return out
            inp = x if self.inject == "none" else torch.cat([x, z0], 1)
            return out + torch.tanh(self.anchor_gate) * (self.net(inp) - x)
        if self.inject == "none":
            return self.net(x)
        want = getattr(self.net, "in_channels", 2 * x.shape[1])
        if want != 2 * x.shape[1]:
            raise ValueError(f"DEGRAD: inject={self.inject} feeds the network {2 * x.shape[1]} channels ([x, z0]) "
                             f"but it takes {want}; set method.net.in_channels to twice data.channels (conf/method/degrad.yaml "
                             f"does this) and method.net.out_channels to data.channels")
        out = self.net(torch.cat([x, z0], 1))
        return z0 + torch.tanh(self.anchor_gate) * out if self.inject == "anchor" else out

    def init(self, meas: Measurement) -> Tensor:
        """z0: the task's initializer, the Wiener estimate, TV's or smoothed TV's solution (``initializer``)."""
        if self.initializer == "task":
            return meas.init()
        if self.initializer == "smooth_tv":
            return smoothed_tv_solve(meas, self.tv_weight, self.tv_eps, self.initializer_tol, self.initializer_max_iter,
                                     prox=self.uses_prox(meas))
        with torch.no_grad():
            return (self.wiener if self.wiener is not None else self.tv_init)(meas).x

    def network_map(self, meas: Measurement) -> Callable[[Tensor], Tensor]:
        z0 = None if self.inject == "none" else self.init(meas)
        return lambda x: self.N(x, z0, self.prior_weight(meas, x), self.prior_scale(meas, x))

    def regularizer(self, x: Tensor, z0: Tensor | None = None, lam: Tensor | None = None,
                    scale: Tensor | float = 1.0) -> Tensor:
        """S(x) = lam (x - N(x)) (``lam``: :meth:`prior_weight`; the plain weight when not given)."""
        lam = self.reg_weight if lam is None else lam
        return lam * (x - self.N(x, z0, lam, scale))

    def T(self, x: Tensor, meas: Measurement, eta: Tensor | None, z0: Tensor | None = None) -> Tensor:
        """One DE-GRAD step, eq. (3.6) of Liu et al. [1] (``data_step="prox"``: T_prox of the class docstring).
        ``z0``: the injected initializer (computed from ``meas`` when needed and not given)."""
        if self.inject != "none" and z0 is None:
            z0 = self.init(meas)
        lam = self.prior_weight(meas, x)
        scale = self.prior_scale(meas, x)
        if self.uses_prox(meas):
            return meas.prox_data(self.N(x, z0, lam, scale), lam)
        return x - eta * (meas.grad(x) + self.regularizer(x, z0, lam, scale))

    def bound_map(self, meas: Measurement, eta: Tensor | None, z0: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        z0 = self.init(meas) if z0 is None and self.inject != "none" else z0
        return lambda x: self.T(x, meas, eta, z0)

    def forward(self, meas: Measurement) -> Reconstruction:
        z0 = self.init(meas)
        eta = self.step_size(meas, z0)
        return self.solve_map(self.bound_map(meas, eta, z0), z0, module=self)
