import math

import pytest
import torch

from jfb_ip.physics import Deblur, GaussianBlur
from jfb_ip.linalg import batch_dot

SHAPES = [(2, 3, 17, 23), (1, 1, 9, 31), (3, 2, 12, 12)]


def _ops(batch):
    g = torch.Generator().manual_seed(0)
    yield GaussianBlur.from_std(9, 5 ** 0.5, "circular", dtype=torch.float64)
    yield GaussianBlur.from_std(5, 1.0, "zeros", dtype=torch.float64)
    # a non-symmetric kernel per sample: catches a conv/correlation mix-up in A or A^T
    yield GaussianBlur(torch.rand(batch, 5, 7, generator=g, dtype=torch.float64), "circular")
    yield GaussianBlur(torch.rand(batch, 3, 5, generator=g, dtype=torch.float64), "zeros")


@pytest.mark.parametrize("shape", SHAPES)
def test_adjointness_float64(shape):
    g = torch.Generator().manual_seed(1)
    for op in _ops(shape[0]):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        y = torch.randn(shape, generator=g, dtype=torch.float64)
        lhs, rhs = batch_dot(op.A(x), y), batch_dot(x, op.A_adjoint(y))
        assert ((lhs - rhs).abs() / rhs.abs().clamp_min(1e-12)).max() < 1e-10, op.padding


def test_blur_is_not_identity_and_preserves_constants():
    op = GaussianBlur.from_std(9, 5 ** 0.5, "circular", dtype=torch.float64)
    x = torch.rand(1, 3, 20, 20, dtype=torch.float64)
    assert (op.A(x) - x).abs().max() > 1e-2
    c = torch.full((1, 3, 20, 20), 0.3, dtype=torch.float64)
    assert torch.allclose(op.A(c), c)


def dense(fn, shape) -> torch.Tensor:
    """The matrix of a linear map on tensors of ``shape`` (batch 1), column j = fn(e_j)."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    return torch.stack([fn(e[None]).flatten() for e in eye], dim=1)


@pytest.mark.parametrize("i", range(4))
def test_lambda_max_equals_the_dense_matrix_top_singular_value_squared(i):
    shape = (1, 2, 11, 13)
    op = list(_ops(1))[i]
    A = dense(op.A, shape)
    sigma_max = torch.linalg.matrix_norm(A, ord=2)
    assert op.lambda_max(shape, torch.float64).item() == pytest.approx(sigma_max.item() ** 2, rel=1e-4)


@pytest.mark.parametrize("i", range(4))
@pytest.mark.parametrize("prior", ["identity", "gradient"])
def test_prox_and_tikhonov_match_dense_solves(i, prior):
    from jfb_ip.methods import tikhonov
    from jfb_ip.physics import Measurement, laplacian

    shape = (1, 2, 11, 13)
    op = list(_ops(1))[i]
    g = torch.Generator().manual_seed(2)
    y, v = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    A = dense(op.A, shape)
    n = A.shape[0]
    p = op.prox_data(v, 0.2, y, n_iter=500, tol=1e-12)
    p_ref = torch.linalg.solve(A.T @ A + 0.2 * torch.eye(n, dtype=A.dtype), A.T @ y.flatten() + 0.2 * v.flatten())
    assert torch.allclose(p.flatten(), p_ref, atol=1e-8)
    # the closed form (circular) uses circular differences, CG the replicate-border ones
    border = "circular" if op.padding == "circular" else "replicate"
    PtP = torch.eye(n, dtype=A.dtype) if prior == "identity" else dense(lambda x: laplacian(x, border), shape)
    meas = Measurement(y=y, physics=op, sigma=torch.zeros(1), x_shape=torch.Size(shape))
    x = tikhonov(meas, 0.05, prior, n_iter=2000, tol=1e-12)
    x_ref = torch.linalg.solve(A.T @ A + 0.05 * PtP, A.T @ y.flatten())
    assert torch.allclose(x.flatten(), x_ref, atol=1e-7)


def test_seeded_measurements_repeat_and_differ_by_seed():
    task = Deblur(channels=3)
    x = torch.rand(4, 3, 16, 16)
    a = task.sample(x, seeds=torch.arange(4)).y
    b = task.sample(x[[1, 0, 3, 2]], seeds=torch.tensor([1, 0, 3, 2])).y
    assert torch.equal(a, b[[1, 0, 3, 2]])  # per-sample seeds: independent of batch order
    c = task.sample(x, seeds=torch.arange(4) + 10).y
    assert not torch.equal(a, c)
    noise = a - task.operator(x).A(x)
    assert abs(noise.std().item() - 0.01) < 2e-3


def test_wrong_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="channels"):
        Deblur(channels=3).sample(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Deblur(channels=3).sample(torch.rand(3, 16, 16))
