"""What every reconstruction method shares: its one return type, the equilibrium options, the loss."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..physics import Measurement
from ..solvers import SolverStats, equilibrium
from ..solvers.equilibrium import check_names
from ..solvers.lipschitz import local_lipschitz


@dataclass
class Reconstruction:
    """What ``Method.forward(meas)`` returns: one value, nothing read back from the method.

    x:      the estimate (B, C, H, W).
    stages: the per-stage estimates x_1 .. x_K of unrolled methods (x_K is ``x``); empty otherwise.
    stats:  the fixed-point solve's :class:`SolverStats` (LUSER: the K inner solves merged, with
            ``parts`` per stage); None for methods without a fixed point.
    penalty: a differentiable scalar the method adds to the training loss (the contraction penalty of
            :meth:`FixedPointMethod.contraction_term`), or None.
    lipschitz: the per-sample Lip(T) estimates that penalty was computed from (detached; for the logs), or None.
    """

    x: Tensor
    stages: list[Tensor] = field(default_factory=list)
    stats: SolverStats | None = None
    penalty: Tensor | None = None
    lipschitz: Tensor | None = None

    def solver_stats(self) -> SolverStats | None:
        """The stats including what backward hooks filled in after the forward pass."""
        return None if self.stats is None else self.stats.refresh()

    def loss(self, x: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], aux_loss: bool = False,
             keep: Tensor | None = None) -> Tensor:
        """loss_fn(x_hat, x) on the samples in ``keep`` (all by default), plus, with ``aux_loss``,
        loss_fn of every intermediate stage (Guan et al. [3], "Aux loss"): the one place this is computed."""
        sel = (lambda t: t) if keep is None else (lambda t: t[keep])
        total = loss_fn(sel(self.x), sel(x))
        if aux_loss and len(self.stages) > 1:
            total = total + sum(loss_fn(sel(s), sel(x)) for s in self.stages[:-1])
        if self.penalty is not None:
            total = total + self.penalty
        return total


class Method(nn.Module):
    """``forward(meas) -> Reconstruction``.

    ``n_stages``: how many per-stage estimates ``Reconstruction.stages`` holds (1: none).
    ``aux_loss``: add the loss of every intermediate stage (Guan et al. [3]).
    ``backward_mode``: the backward mode of its fixed point, or None.
    """

    n_stages: int = 1
    aux_loss: bool = False
    backward_mode: str | None = None

    def forward(self, meas: Measurement) -> Reconstruction:  # pragma: no cover
        raise NotImplementedError


class Equilibrium:
    """The ``solver`` and ``backward`` config groups of a method, callable as ``solve(f, z0)``.

    Args:
        solver: the forward solver: ``name`` ('anderson', 'broyden', 'fixed_point'), ``tol``,
            ``max_iter``, ``train_tol`` (the tolerance of the solves made in training; null: ``tol``) and the
            solver's own keys (Anderson: m, lam, beta; Broyden: memory; all: bound).
        backward: ``mode`` plus that mode's options (null values take the mode's default).
    Every key is checked when the method is built, so a typo fails before training starts.

    ``train_tol`` exists because a training step's cost is mostly its forward solve, and JFB's gradient
    (one differentiable application of T) is an approximation whatever the residual: solving training's
    fixed points to 1e-2 instead of 1e-3 took half the Anderson iterations per step for the same test PSNR
    (measured on deblurring; conf/method_task/degrad_deblur.yaml). Validation and test always solve to ``tol``, so every
    reported number is an equilibrium met to ``tol``; training's ``converged_fraction`` is against ``train_tol``.
    """

    def __init__(self, solver: Mapping[str, Any], backward: Mapping[str, Any]):
        solver, backward = dict(solver), dict(backward)
        self.forward = solver.pop("name", "anderson")
        if self.forward == "none":
            raise ValueError("this method solves a fixed point: choose a forward solver (solver=anderson, "
                             "solver=broyden or solver=fixed_point), not solver=none")
        missing = {"tol", "max_iter"} - set(solver)
        if missing:
            raise ValueError(f"solver config lacks {sorted(missing)} (see conf/solver/{self.forward}.yaml)")
        self.tol, self.max_iter = solver.pop("tol"), solver.pop("max_iter")
        train_tol = solver.pop("train_tol", None)
        if train_tol is not None and (isinstance(train_tol, bool) or not isinstance(train_tol, (int, float))
                                      or not train_tol >= 0):
            raise ValueError(f"solver.train_tol must be a relative residual >= 0, or null for solver.tol; got "
                             f"{train_tol!r}")
        self.train_tol = self.tol if train_tol is None else float(train_tol)
        self.mode = backward.pop("mode", "jfb")
        check_names(self.forward, self.mode, backward, solver)  # fail when the config is built
        self.solver_options, self.backward_options = solver, backward
        # run the options' own checks too (a negative tol, neumann_k=-1, ...) before any training
        with torch.no_grad():
            equilibrium(lambda z: 0.5 * z, torch.ones(1, 1), forward=self.forward, backward=self.mode, tol=self.tol,
                        max_iter=self.max_iter, backward_options=self.backward_options, **self.solver_options)

    def __call__(self, f, z0: Tensor, module: nn.Module | None = None,
                 training: bool = False) -> tuple[Tensor, SolverStats]:
        """The fixed point of ``f`` from ``z0``, to ``train_tol`` when ``training`` (the caller's
        ``nn.Module.training``) and to ``tol`` otherwise. ``module``: the network inside ``f``; its BatchNorm
        layers then use running statistics wherever ``f`` runs without grad (see :func:`running_stats_without_grad`)."""
        if module is not None:
            f = running_stats_without_grad(f, module)
        return equilibrium(f, z0, forward=self.forward, backward=self.mode, tol=self.train_tol if training else self.tol,
                           max_iter=self.max_iter, backward_options=self.backward_options, **self.solver_options)


def running_stats_without_grad(f: Callable[[Tensor], Tensor], module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``f`` with ``module``'s training-mode BatchNorm layers on their running statistics whenever grad is off.

    Liu et al. [1] put BatchNorm in their DnCNN but do not say how it behaves inside the fixed-point solve. In
    training mode it would normalise each solver iteration with the current iterates' batch statistics and
    move the running averages at every iteration: T would change from one iteration to the next and a
    sample's fixed point would depend on the rest of its batch. So the no-grad forward solve uses the
    running statistics (one fixed map, each sample on its own), and only the differentiable application(s)
    of ``f`` after it (JFB's one step; ``unroll_steps`` for unroll) use batch statistics and update the
    running averages. In eval mode every BatchNorm uses running statistics anyway.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return f

    def g(z: Tensor) -> Tensor:
        training = [m for m in bns if m.training]
        if torch.is_grad_enabled() or not training:
            return f(z)
        for m in training:
            m.eval()
        try:
            return f(z)
        finally:
            for m in training:
                m.train()

    return g


def refuse_fixed_point_options(method: str, solver: Mapping[str, Any] | None, backward: Mapping[str, Any] | None,
                               mode: str, why: str) -> None:
    """For a method without a fixed point: the ``solver`` group must be ``none`` and the ``backward``
    group ``mode`` with no option set, or the run would silently ignore what the user asked for."""
    name = dict(solver or {}).get("name", "none")
    if name != "none":
        raise ValueError(f"method={method} {why}, so solver={name} cannot apply; drop the solver override")
    backward = dict(backward or {})
    chosen = backward.pop("mode", mode)
    if chosen != mode:
        raise ValueError(f"method={method} {why}, so backward={chosen} cannot apply; use backward={mode} (its default)")
    extra = {k: v for k, v in backward.items() if v is not None}
    if extra:
        raise ValueError(f"method={method} takes no backward options, got {extra} ({why}); drop the backward.* "
                         f"override(s)")


class FixedPointMethod(Method):
    """A method whose output is the fixed point of a map T(x; meas) (see :class:`Equilibrium`).

    Subclasses with a network ``net`` inside ``T(x, meas, eta)`` and a ``step_size(meas, like)``
    get :meth:`lipschitz_estimates` (logged at validation when ``log_lipschitz``) and the training-time
    contraction penalty (:meth:`contraction_term`; ``contraction_penalty`` > 0 turns it on)."""

    def __init__(self, solver: Mapping[str, Any], backward: Mapping[str, Any], log_lipschitz: bool = False,
                 contraction_penalty: float = 0.0, contraction_target: float = 0.9, contraction_iters: int = 4):
        super().__init__()
        self.solve = Equilibrium(solver, backward)
        self.backward_mode = self.solve.mode
        self.log_lipschitz = log_lipschitz
        if not contraction_penalty >= 0:
            raise ValueError(f"contraction_penalty must be >= 0 (0: off), got {contraction_penalty!r}")
        if not 0 < contraction_target:
            raise ValueError(f"contraction_target must be > 0 (the Lip(T) above which the penalty acts; < 1 asks for "
                             f"a contraction), got {contraction_target!r}")
        if int(contraction_iters) != contraction_iters or contraction_iters < 1:
            raise ValueError(f"contraction_iters must be an integer >= 1 (power iterations), got {contraction_iters!r}")
        self.contraction_penalty = float(contraction_penalty)
        self.contraction_target = float(contraction_target)
        self.contraction_iters = int(contraction_iters)

    def contraction_term(self, f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The contraction penalty ``w * mean_i max(0, ||J_T(x_i)||_2 - rho)^2`` at the fixed points x (training only).

        Nothing in the kernel-normalised network bounds Lip(T) (DnCNN), and where T is the network itself on a
        subspace (the data prox on unsampled k-space, dropped pixels) training can drive Lip(T) far above 1: the
        solves then stop converging, and JFB's gradient (which assumes an equilibrium) degrades with them. This
        measures the local spectral norm of T's Jacobian at each fixed point by ``contraction_iters`` power
        iterations (no gradient; the estimate is a lower bound that rises with iterations), u the top left
        singular vector found, and differentiates sigma = ||J_T(x)^T u|| with respect to the weights (one double
        backward): the penalty pushes the largest local gain below ``rho`` where it is above, and is zero where
        the map already contracts. A spectral variant of Bai, Koltun & Kolter's Jacobian regularisation
        ("Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021), who penalise the Frobenius norm;
        here the norm that decides convergence. Returns (penalty, per-sample sigma) or (None, None) when off,
        out of training, or without grad.
        """
        if self.contraction_penalty == 0 or not self.training or not torch.is_grad_enabled():
            return None, None
        if any(m.training for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            raise ValueError("contraction_penalty needs T to act on each sample separately, and BatchNorm in training "
                             "mode mixes the batch: set method.net.batch_norm=false or method.contraction_penalty=0")
        estimate, u = local_lipschitz(f, x, self.contraction_iters, tol=0.0, return_left=True)
        if (estimate <= self.contraction_target).all():  # the penalty and its gradient are 0: skip the double backward
            return estimate.new_zeros(()), estimate
        z = x.detach().requires_grad_(True)
        jt_u = torch.autograd.grad(f(z), z, u, create_graph=True)[0]
        sigma = jt_u.flatten(1).norm(dim=1)
        penalty = self.contraction_penalty * (sigma - self.contraction_target).clamp_min(0).pow(2).mean()
        return penalty, sigma.detach()

    def solve_map(self, f: Callable[[Tensor], Tensor], z0: Tensor, module: nn.Module) -> Reconstruction:
        """The fixed point of ``f`` from ``z0`` with the weights fixed for the whole solve (:func:`fixed_weights`),
        and the training-time contraction penalty at it (:meth:`contraction_term`). ``module``: the network inside
        ``f``, for :meth:`Equilibrium.__call__`."""
        with fixed_weights(self):
            x, stats = self.solve(f, z0, module=module, training=self.training)
            penalty, lip = self.contraction_term(f, x)
        return Reconstruction(x, stats=stats, penalty=penalty, lipschitz=lip)

    def network_map(self, meas: Measurement) -> Callable[[Tensor], Tensor]:
        """The network inside T as a map of the image alone (MTDEQ binds its per-sample noise level)."""
        return self.net

    def bound_map(self, meas: Measurement, eta: Tensor | None) -> Callable[[Tensor], Tensor]:
        """T as a map of the image alone, with whatever it needs from ``meas`` computed once (DEGRAD's z0)."""
        return lambda x: self.T(x, meas, eta)

    def lipschitz_estimates(self, meas: Measurement, n_iter: int = 20,
                            rec: Reconstruction | None = None) -> dict[str, float]:
        """Local Lipschitz constants of the network and of T at this batch's fixed points (power
        iteration on J^T J; mean and max over samples). Theorem 3.1 of Liu et al. [1] needs Lip(T) < 1 for
        a contraction; whether the network's normalisation guarantees it is said in DnCNN's docstring.

        Also ``equilibrium_error``: what the solve's stopping residual says about its distance to the
        equilibrium. If T contracts with factor q near z*, ||z - z*|| <= ||T(z) - z|| / (1 - q), so
        relative to ||T(z)|| the error is at most residual / (1 - q); where q >= 1 there is no bound
        (``equilibrium_unbounded_fraction`` counts those samples). A residual under
        ``tol`` pins z* down only to that: large where eta lam (1 - Lip N) is small (inpainting holes).
        ``rec``: this method's output on ``meas`` where the caller has it (validation), so it is not solved again."""
        if not self.log_lipschitz:
            return {}
        if rec is None:
            with torch.no_grad():
                rec = self(meas)
        z = rec.x
        eta = self.step_size(meas, z)
        g = torch.Generator(device=z.device).manual_seed(0)
        with fixed_weights(self):
            lip_n = local_lipschitz(self.network_map(meas), z, n_iter, generator=g)
            lip_t = local_lipschitz(self.bound_map(meas, eta), z, n_iter, generator=g)
        gap = 1.0 - lip_t.to(rec.stats.residual.dtype)
        bounded = gap > 0
        err = rec.stats.residual[bounded] / gap[bounded]
        out = {"lipschitz_net_mean": lip_n.mean().item(), "lipschitz_net_max": lip_n.max().item(),
               "lipschitz_T_mean": lip_t.mean().item(), "lipschitz_T_max": lip_t.max().item(),
               "equilibrium_unbounded_fraction": (~bounded).float().mean().item()}
        if err.numel():  # over the samples where T contracts; the others have no bound (counted above)
            out["equilibrium_error_max"] = err.max().item()
        return out


@contextmanager
def fixed_weights(module: nn.Module):
    """Evaluate parametrised weights (spectral norm) once and reuse them for every call inside.

    In training mode spectral normalisation runs a power-iteration step at every forward,
    so without this the map T would change at each solver iteration and the fixed point,
    the JFB step and the implicit gradient would belong to different maps. The weights are
    first evaluated with grad enabled (when it is) so the differentiable steps still reach
    the raw parameters.
    """
    with parametrize.cached():
        with torch.enable_grad() if torch.is_grad_enabled() else nullcontext():
            for m in module.modules():
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)
        yield
