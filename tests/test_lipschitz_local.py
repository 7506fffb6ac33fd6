"""local_lipschitz against closed forms: a batched dense linear map and tanh(Wx) (Jacobian diag(1 - tanh^2) W)."""
import torch

from jfb_ip.solvers.lipschitz import local_lipschitz

D = torch.float64


def test_linear_map_gives_the_top_singular_value_per_sample():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 7, 5, generator=g, dtype=D)
    f = lambda x: torch.einsum("bij,bj->bi", W, x)  # noqa: E731
    est = local_lipschitz(f, torch.randn(3, 5, generator=g, dtype=D), n_iter=500, tol=1e-12, generator=g)
    assert torch.allclose(est, torch.linalg.matrix_norm(W, ord=2), rtol=1e-4)


def test_nonlinear_map_at_a_point_matches_the_dense_jacobian():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 6, generator=g, dtype=D)
    x = torch.randn(2, 6, generator=g, dtype=D)
    f = lambda z: torch.tanh(z @ W.T)  # noqa: E731
    est = local_lipschitz(f, x, n_iter=500, tol=1e-12, generator=g)
    for i in range(2):
        J = torch.autograd.functional.jacobian(lambda z: torch.tanh(W @ z), x[i])
        assert abs(est[i] - torch.linalg.matrix_norm(J, ord=2)) < 1e-4 * est[i]
