"""Per-sample statistics of an equilibrium solve."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SolverStats:
    """What a fixed-point solve reports, one entry per sample.

    iterations: (B,) forward iterations until the sample met ``tol`` (max_iter if never).
    residual:   (B,) final relative residual ||f(z) - z|| / ||f(z)|| of the returned z.
    diverged:   (B,) True where the iterate became non-finite or exceeded the bound.
    trace:      max relative residual over the batch after each iteration (for plots/tests).
    backward_iterations / backward_residual: filled in once a backward solve ran (per sample).
    """

    iterations: Tensor
    residual: Tensor
    diverged: Tensor
    trace: list[float] = field(default_factory=list)
    backward_iterations: Tensor | None = None
    backward_residual: Tensor | None = None
    # the per-stage stats a merged object was built from (their backward fields fill in later)
    parts: list["SolverStats"] | None = None

    @property
    def converged(self) -> Tensor:
        return ~self.diverged

    def summary(self, prefix: str = "solver/") -> dict[str, float]:
        """Scalars to log: mean/max iterations, mean/max residual, diverged count."""
        out = {
            f"{prefix}fwd_iters_mean": self.iterations.float().mean().item(),
            f"{prefix}fwd_iters_max": self.iterations.max().item(),
            f"{prefix}fwd_residual_mean": self.residual.float().mean().item(),
            f"{prefix}fwd_residual_max": self.residual.float().max().item(),
            f"{prefix}diverged": self.diverged.sum().item(),
        }
        if self.backward_iterations is not None:
            out[f"{prefix}bwd_iters_mean"] = self.backward_iterations.float().mean().item()
            out[f"{prefix}bwd_residual_max"] = self.backward_residual.float().max().item()
        return out

    @staticmethod
    def merge(stats: list["SolverStats"]) -> "SolverStats":
        """Combine the solves of several stages of one batch (e.g. LUSER's K inner solves):
        iterations add up, the residual is the worst, a sample diverged if any stage did.
        Backward solves run later, so merge ``parts`` again after backward to see them."""
        first = stats[0]
        bi = [s.backward_iterations for s in stats if s.backward_iterations is not None]
        br = [s.backward_residual for s in stats if s.backward_residual is not None]
        return SolverStats(
            iterations=torch.stack([s.iterations for s in stats]).sum(0),
            residual=torch.stack([s.residual for s in stats]).amax(0),
            diverged=torch.stack([s.diverged for s in stats]).any(0),
            trace=[t for s in stats for t in s.trace],
            backward_iterations=torch.stack(bi).sum(0) if bi else None,
            backward_residual=torch.stack(br).amax(0) if br else first.backward_residual,
            parts=list(stats),
        )
