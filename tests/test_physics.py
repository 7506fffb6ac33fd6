import pytest
import torch

from jfb_ip.physics import Deblur, GaussianBlur, batch_dot

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


def test_norm_matches_power_iteration_and_fft():
    from jfb_ip.physics import LinearOperator

    like = torch.zeros(2, 3, 19, 21, dtype=torch.float64)
    for op in _ops(2):
        L_pow = LinearOperator.norm(op, like, n_iter=300)
        assert torch.allclose(op.norm(like), L_pow, rtol=1e-3)


def test_prox_and_tikhonov_solve_their_normal_equations():
    g = torch.Generator().manual_seed(2)
    for op in _ops(2):
        x = torch.randn(2, 3, 15, 13, generator=g, dtype=torch.float64)
        y, v = op.A(x), torch.randn_like(x)
        p = op.prox_data(v, 0.2, y)
        r = op.AtA(p) + 0.2 * p - op.A_adjoint(y) - 0.2 * v
        assert r.abs().max() < 1e-4 * op.A_adjoint(y).abs().max()


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
