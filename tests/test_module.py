"""ReconstructionModule: diverged samples are skipped and counted, never learned from."""
from __future__ import annotations

import functools

import torch
from torch import nn

from jfb_ip.lit import ReconstructionModule
from jfb_ip.methods import Method
from jfb_ip.physics import Deblur
from jfb_ip.solvers import equilibrium


class ExplodingMap(Method):
    """z = a_i z + w y: a contraction for every sample but those in ``explode`` (a_i = 3)."""

    def __init__(self, explode: list[int]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.4))
        self.explode = explode

    def forward(self, meas):
        a = torch.full((meas.batch_size, 1, 1, 1), 0.5)
        a[self.explode] = 3.0
        return equilibrium(lambda z: a * z + self.w * meas.y, torch.zeros_like(meas.y), forward="fixed_point",
                           backward="jfb", tol=1e-8, max_iter=200, bound=1e6)


def _module(explode):
    return ReconstructionModule(ExplodingMap(explode), Deblur(kernel_size=3, channels=3),
                                optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def _batch(module, n=4):
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, module.task.sample(x, seeds=torch.arange(n)), torch.arange(n)


def test_diverged_samples_are_skipped_and_do_not_touch_the_gradient():
    module = _module([1])
    x, meas, idx = _batch(module)
    loss = module.training_step((x, meas, idx), 0)
    assert torch.isfinite(loss) and module.skipped_samples == 1
    loss.backward()
    g_skip = module.method.w.grad.clone()

    clean = _module([])
    keep = torch.tensor([0, 2, 3])
    meas_keep = clean.task.sample(x[keep], seeds=keep)
    clean.training_step((x[keep], meas_keep, keep), 0).backward()
    assert torch.allclose(g_skip, clean.method.w.grad)


def test_a_batch_that_all_diverges_takes_no_step():
    module = _module([0, 1, 2, 3])
    assert module.training_step(_batch(module), 0) is None
    assert module.skipped_samples == 4
    assert module.method.w.grad is None
