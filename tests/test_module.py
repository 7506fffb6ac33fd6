"""ReconstructionModule: diverged samples are skipped and counted, never learned from."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from jfb_ip.lit import ReconstructionModule
from jfb_ip.lit.errors import TrainingDiverged
from jfb_ip.methods import Method, Reconstruction
from jfb_ip.physics import Deblur
from jfb_ip.solvers import equilibrium


class ExplodingMap(Method):
    """z = a_i z + w y: a contraction (a_i = 0.5) except for bright samples (mean y > 0.8, a_i = 3),
    decided from the data so that a re-run on a sub-batch explodes the same samples."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.4))

    def forward(self, meas):
        bright = meas.y.flatten(1).mean(1) > 0.8
        a = torch.where(bright, 3.0, 0.5).reshape(-1, 1, 1, 1)
        z, stats = equilibrium(lambda z: a * z + self.w * meas.y, torch.zeros_like(meas.y), forward="fixed_point",
                               backward="jfb", tol=1e-8, max_iter=200, bound=1e6)
        return Reconstruction(z, stats=stats)


def _module():
    return ReconstructionModule(ExplodingMap(), Deblur(kernel_size=3, channels=3),
                                optimizer=functools.partial(torch.optim.SGD, lr=0.1), max_skipped_batches=3)


def _batch(module, bright=(), n=4):
    x = 0.5 * torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[list(bright)] = 0.95
    return x, module.task.sample(x, seeds=torch.arange(n)), torch.arange(n)


def test_diverged_samples_are_skipped_and_do_not_touch_the_gradient():
    module = _module()
    x, meas, idx = _batch(module, bright=[1])
    loss = module.training_loss((x, meas, idx))
    assert torch.isfinite(loss) and module.skipped_samples == 1
    loss.backward()
    g_skip = module.method.w.grad.clone()
    assert torch.isfinite(g_skip)

    clean = _module()
    keep = torch.tensor([0, 2, 3])
    meas_keep = clean.task.sample(x[keep], seeds=keep)
    clean.training_loss((x[keep], meas_keep, keep)).backward()
    assert torch.allclose(g_skip, clean.method.w.grad)


def test_a_batch_that_all_diverges_takes_no_step_and_many_stop_training():
    module = _module()
    batch = _batch(module, bright=[0, 1, 2, 3])
    assert module.training_loss(batch) is None
    assert module.skipped_samples == 4
    assert module.method.w.grad is None
    module.training_loss(batch)
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        module.training_loss(batch)


def test_aux_loss_is_the_sum_of_the_stage_losses():
    """Reconstruction.loss against an independent sum of per-stage MSEs."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 5, 5, generator=g)
    stages = [torch.rand(3, 1, 5, 5, generator=g, requires_grad=True) for _ in range(3)]
    rec = Reconstruction(stages[-1], stages=stages)
    mse = [((s - x) ** 2).mean() for s in stages]
    assert torch.allclose(rec.loss(x, nn.functional.mse_loss, aux_loss=True), mse[0] + mse[1] + mse[2])
    assert torch.allclose(rec.loss(x, nn.functional.mse_loss, aux_loss=False), mse[2])
    keep = torch.tensor([True, False, True])
    manual = sum(((s[[0, 2]] - x[[0, 2]]) ** 2).mean() for s in stages)
    loss = rec.loss(x, nn.functional.mse_loss, aux_loss=True, keep=keep)
    assert torch.allclose(loss, manual)
    loss.backward()
    assert all(s.grad is not None and s.grad[1].abs().sum() == 0 and s.grad[0].abs().sum() > 0 for s in stages)
