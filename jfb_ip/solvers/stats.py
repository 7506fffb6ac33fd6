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
    converged:  (B,) True where the residual reached ``tol``: a sample stopped by ``max_iter``
                is not converged, whatever its residual; a diverged one never is.
    trace:      max relative residual over the batch after each iteration (for plots/tests).
    backward_iterations / backward_residual: filled in once a backward solve ran (per sample).
    """

    iterations: Tensor
    residual: Tensor
    diverged: Tensor
    converged: Tensor
    trace: list[float] = field(default_factory=list)
    backward_iterations: Tensor | None = None
    backward_residual: Tensor | None = None
    # the per-stage stats a merged object was built from (their backward fields fill in later)
    parts: list["SolverStats"] | None = None

    def summary(self, prefix: str = "solver/") -> dict[str, float]:
        """Scalars to log: iterations, residual (mean/max), diverged count, converged fraction,
        and the backward solve's iterations and residual once it ran."""
        res = self.residual.float()
        finite = res[torch.isfinite(res)]
        out = {
            f"{prefix}fwd_iters_mean": self.iterations.float().mean().item(),
            f"{prefix}fwd_iters_max": self.iterations.max().item(),
            f"{prefix}fwd_residual_mean": finite.mean().item() if finite.numel() else float("nan"),
            f"{prefix}fwd_residual_max": finite.max().item() if finite.numel() else float("nan"),
            f"{prefix}diverged": self.diverged.sum().item(),
            f"{prefix}converged_fraction": self.converged.float().mean().item(),
        }
        if self.backward_iterations is not None:
            out[f"{prefix}bwd_iters_mean"] = self.backward_iterations.float().mean().item()
            out[f"{prefix}bwd_residual_max"] = self.backward_residual.float().max().item()
        return out

    @staticmethod
    def merge(stats: list["SolverStats"]) -> "SolverStats":
        """Combine the solves of several stages of one batch (e.g. LUSER's K inner solves):
        iterations add up, the residual is the worst, a sample diverged if any stage did and
        converged only if every stage did. The backward solves run later: call
        :meth:`refresh` after backward to see them."""
        bi = [s.backward_iterations for s in stats if s.backward_iterations is not None]
        br = [s.backward_residual for s in stats if s.backward_residual is not None]
        return SolverStats(
            iterations=torch.stack([s.iterations for s in stats]).sum(0),
            residual=torch.stack([s.residual for s in stats]).amax(0),
            diverged=torch.stack([s.diverged for s in stats]).any(0),
            converged=torch.stack([s.converged for s in stats]).all(0),
            trace=[t for s in stats for t in s.trace],
            backward_iterations=torch.stack(bi).sum(0) if bi else None,
            backward_residual=torch.stack(br).amax(0) if br else None,
            parts=list(stats),
        )

    def refresh(self) -> "SolverStats":
        """The same stats with the backward fields of its parts (filled in by backward hooks)."""
        return SolverStats.merge(self.parts) if self.parts else self
