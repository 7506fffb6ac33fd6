"""DE-Prox (Liu et al. [2] §3.3 ii) and its averaged form: the fixed point against a dense solve, the contraction
bound."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from jfb_ip.methods import DEProx
from jfb_ip.nets import DnCNN
from jfb_ip.physics import GaussianBlur, Measurement
from jfb_ip.solvers.lipschitz import local_lipschitz


class Scale(nn.Module):
    """N(y) = c y: a linear 'network', so the averaged DE-Prox fixed point has a closed form."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, y):
        return self.c * y


def blur_measurement(B=2, shape=(1, 6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    op = GaussianBlur(torch.rand(B, 3, 3, generator=g, dtype=torch.float64), "circular")
    x = torch.rand(B, *shape, generator=g, dtype=torch.float64)
    y = op.A(x) + 0.01 * torch.randn(B, *shape, generator=g, dtype=torch.float64)
    return Measurement(y, op, torch.full((B,), 0.01, dtype=torch.float64), x.shape)


def method(net, averaged, tol=1e-12, max_iter=500):
    return DEProx(net, {"name": "anderson", "tol": tol, "max_iter": max_iter}, {"mode": "jfb"},
                  averaged=averaged).double()


def test_averaged_fixed_point_equals_a_dense_solve():
    """x = k (x - eta A^T(Ax - d)) with k = 1 - alpha + alpha c: x = (I - k (I - eta A^T A))^{-1} k eta A^T d, the
    matrices built column by column from the operator."""
    meas = blur_measurement()
    alpha, c = 0.3, 0.8
    rec = method(Scale(c), alpha)(meas)
    assert bool(rec.stats.converged.all())
    B, shape = meas.y.shape[0], meas.y.shape[1:]
    d = shape.numel()
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    eye = torch.eye(d, dtype=torch.float64)
    k = 1 - alpha + alpha * c
    eta = 1.0 / meas.lambda_max()
    for b in range(B):
        AtA = torch.stack([meas.physics.AtA(basis[j].expand(B, *shape))[b].reshape(d) for j in range(d)], -1)
        Atd = meas.physics.A_adjoint(meas.y)[b].reshape(d)
        x = torch.linalg.solve(eye - k * (eye - eta[b] * AtA), k * eta[b] * Atd)
        assert torch.allclose(rec.x[b].reshape(d), x, atol=1e-9)


def test_averaged_form_is_a_contraction_with_operator_norm_convs_and_alpha_learns():
    """Lip(T) <= 1 - alpha (1 - gamma^depth) with norm_mode=operator, measured by power iteration (worst-case
    directions) at random points; S = N alone gives the weaker bound gamma^depth; alpha receives a gradient."""
    torch.manual_seed(0)
    net = DnCNN(in_channels=1, depth=3, width=8, norm_mode="operator", gamma=0.99).double().eval()
    meas = blur_measurement(B=3, shape=(1, 11, 13), seed=1)
    alpha = 0.2
    m = method(net, alpha)
    eta = m.step_size(meas, meas.y)
    z = torch.rand_like(meas.y)
    net(z)  # records each conv's input size for its operator norm
    g = torch.Generator().manual_seed(2)
    lip = local_lipschitz(lambda x: m.T(x, meas, eta), z, n_iter=200, tol=1e-7, generator=g)
    bound = 1 - alpha * (1 - 0.99 ** 3)
    assert (lip <= bound * (1 + 1e-4)).all(), (lip, bound)
    # the same architecture without the normalisation, its convs scaled up, breaks the bound: the check can fail
    torch.manual_seed(0)
    free = DnCNN(in_channels=1, depth=3, width=8, spectral_norm=False).double().eval()
    with torch.no_grad():
        for p in free.parameters():
            p.mul_(4.0)
    mf = method(free, alpha)
    lip_free = local_lipschitz(lambda x: mf.T(x, meas, eta), z, n_iter=200, tol=1e-7, generator=g)
    assert (lip_free > bound).all(), lip_free
    loss = m.T(z, meas, eta).square().sum()
    loss.backward()
    assert m.alpha_logit.grad is not None and m.alpha_logit.grad.abs() > 0
    with pytest.raises(ValueError, match="averaged must lie in"):
        method(net, 1.5)
