"""Loop-unrolled proximal gradient with K stages: LU-DnCNN and LUSER (Guan et al. [3])."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..physics import Measurement
from ..linalg import per_sample
from ..solvers import SolverStats
from .base import Equilibrium, Method, Reconstruction, fixed_weights, refuse_fixed_point_options


class UnrolledMethod(Method):
    """x_{k+1} = prox_k(d_k), d_k = x_k + (s / L) A^T(y - A x_k), k = 0..K-1 (Guan et al. [3] §3).

    ``s`` is one step-size multiplier (learnable by default), scaled by 1/L with
    L = lambda_max(A^T A) so one value suits every operator; x_0 = meas.init().
    Subclasses implement ``prox(k, d) -> (x, stats | None)``.
    """

    def __init__(self, stages: int = 8, step_size: float = 1.0, learn_step_size: bool = True, aux_loss: bool = False):
        super().__init__()
        if stages < 1:
            raise ValueError(f"{type(self).__name__}: stages must be >= 1, got {stages}")
        self.n_stages, self.aux_loss = stages, aux_loss
        self.step_size = nn.Parameter(torch.tensor(float(step_size)), requires_grad=learn_step_size)

    def prox(self, k: int, d: Tensor) -> tuple[Tensor, SolverStats | None]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, meas: Measurement) -> Reconstruction:
        x = meas.init()
        lam = self.step_size / per_sample(meas.lambda_max(), x)
        outputs, stats = [], []
        # spectral-norm weights evaluated once per forward: every stage of LUSER-SW sees the
        # same block, and backward keeps one copy of its weights, not K
        with fixed_weights(self):
            for k in range(self.n_stages):
                d = x - lam * meas.grad(x)
                x, st = self.prox(k, d)
                outputs.append(x)
                if st is not None:
                    stats.append(st)
        return Reconstruction(x, stages=outputs, stats=SolverStats.merge(stats) if stats else None)


class LUDnCNN(UnrolledMethod):
    """LU-DnCNN (Guan et al. [3] §4.1): one DnCNN shared by all K stages, full backprop."""

    def __init__(self, net: nn.Module, stages: int = 8, step_size: float = 1.0, learn_step_size: bool = True,
                 aux_loss: bool = False, backward: Mapping[str, Any] | None = None,
                 solver: Mapping[str, Any] | None = None):
        super().__init__(stages, step_size, learn_step_size, aux_loss)
        refuse_fixed_point_options("lu_dncnn", solver, backward, "unroll",
                                   f"has no fixed point: it backpropagates through its method.stages={stages} stages")
        self.backward_mode = "unroll"
        self.net = net

    def prox(self, k: int, d: Tensor):
        return self.net(d), None


class LUSER(UnrolledMethod):
    """LUSER (Guan et al. [3] §3, eq. 7): each stage's prox is a shallow equilibrium block,
    x_{k+1} = d_k + r*, r* = Mix(Data(r*) (+) Inj(d_k)) solved from r^(0) = 0 with the
    configured forward solver and trained with the configured backward mode.

    Args:
        block: a factory (``_partial_``) of :class:`jfb_ip.nets.LUSERBlock`.
        shared_weights: True is LUSER-SW (one block for all stages), False LUSER-DW (K blocks).
    """

    def __init__(self, block: Callable[[], nn.Module], solver: Mapping[str, Any], backward: Mapping[str, Any],
                 stages: int = 8, shared_weights: bool = False, step_size: float = 1.0,
                 learn_step_size: bool = True, aux_loss: bool = False):
        super().__init__(stages, step_size, learn_step_size, aux_loss)
        self.solve = Equilibrium(solver, backward)
        self.backward_mode = self.solve.mode
        self.blocks = nn.ModuleList([block() for _ in range(1 if shared_weights else stages)])

    def prox(self, k: int, d: Tensor):
        block = self.blocks[k % len(self.blocks)]
        injected = block.inject(d)
        r, stats = self.solve(lambda r: block.step(r, injected), torch.zeros_like(d), module=block,
                               training=self.training)
        return d + r, stats
