"""Methods with one weight chosen on validation data (Wiener, TV, PnP-ADMM): the search they share."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..physics import Measurement
from .base import Method, Reconstruction


class CalibratedMethod(Method):
    """A method with nothing to train whose weight ``lam`` is chosen by a grid search on validation data.

    Every validation batch scores each value of ``lambda_grid`` (:meth:`calibrate_update`, called by the
    LightningModule for every module it calibrates), and :meth:`calibrate_end` keeps the best. The chosen
    value and the ``tuned`` flag are buffers, so they travel in a checkpoint and in ``metrics.json``. The
    test split is never used: the module only calls these from its validation loop. An empty grid keeps
    ``lam`` as given (no search).

    Subclasses implement :meth:`reconstruct` ``(meas, lam) -> Reconstruction``.

    Args:
        name: the method's name in error messages (its config option).
        lam: the weight used until (or, with an empty grid, instead of) the search.
        lambda_grid: the candidate weights (all > 0).
    """

    def __init__(self, name: str, lam: float, lambda_grid: Sequence[float]):
        super().__init__()
        if not lam > 0:
            raise ValueError(f"{name}: lam must be > 0, got {lam!r}")
        self.lambda_grid = [float(v) for v in lambda_grid]
        if any(not v > 0 for v in self.lambda_grid):
            raise ValueError(f"{name}: every lambda_grid value must be > 0, got {self.lambda_grid}")
        self.register_buffer("lam", torch.tensor(float(lam)))
        self.register_buffer("tuned", torch.tensor(False))
        self._scores: Tensor | None = None

    def reconstruct(self, meas: Measurement, lam) -> Reconstruction:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, meas: Measurement) -> Reconstruction:
        return self.reconstruct(meas, self.lam.to(meas.sigma.dtype))

    # ---- the search on validation data (called by the LightningModule)
    def calibrate_start(self) -> None:
        self._scores = torch.zeros(len(self.lambda_grid), dtype=torch.float64)

    @property
    def scores(self) -> Tensor | None:
        """Each lambda's summed validation score so far, from this process's batches (None outside a search)."""
        return self._scores

    def calibrate_update(self, meas: Measurement, x: Tensor, score) -> None:
        """Add ``score(x_hat, x)`` summed over the batch (higher is better) for every lambda. A NaN or -inf score
        (a NaN image, a lambda whose reconstruction blew up) adds nothing: a sample that is NaN at every lambda then
        leaves the choice to the others (under DDP, to the other processes' batches) instead of making every sum NaN,
        and a lambda that fails on a sample loses that sample's score."""
        if self._scores is None:
            self.calibrate_start()
        for i, lam in enumerate(self.lambda_grid):
            scores = score(self.reconstruct(meas, lam).x, x).double()
            self._scores[i] += scores.nan_to_num(nan=0.0, neginf=0.0).sum().cpu()

    def calibrate_end(self, scores: Tensor | None = None) -> None:
        """Keep the best lambda; ``scores`` may be the all-process sum (DDP) of the local ones."""
        scores = self._scores if scores is None else scores
        if scores is None or not self.lambda_grid:
            return
        self.lam.fill_(self.lambda_grid[int(scores.argmax())])
        self.tuned.fill_(True)
        self._scores = None
