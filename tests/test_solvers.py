import pytest
import torch

from jfb_ip.methods import DEGRAD
from jfb_ip.nets import DnCNN
from jfb_ip.physics import Deblur
from jfb_ip.solvers import anderson, equilibrium, fixed_point

D = torch.float64


def linear_contraction(B=3, n=40, rho=0.97, seed=0):
    """f(z) = W z + b with symmetric W of spectral radius ``rho`` per sample; z* solved exactly."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=D))
    eig = torch.linspace(-rho, rho, n, dtype=D)
    W = Q @ torch.diag_embed(eig.expand(B, n)) @ Q.transpose(1, 2)
    b = torch.randn(B, n, generator=g, dtype=D)
    z_star = torch.linalg.solve(torch.eye(n, dtype=D) - W, b)
    return (lambda z: torch.einsum("bij,bj->bi", W, z) + b), z_star


@pytest.mark.parametrize("solver", [anderson, fixed_point])
def test_solvers_reach_the_known_fixed_point(solver):
    f, z_star = linear_contraction()
    z, stats = solver(f, torch.zeros_like(z_star), tol=1e-10, max_iter=3000)
    assert torch.allclose(z, z_star, atol=1e-7)
    assert (stats.residual < 1e-10).all() and not stats.diverged.any()
    assert stats.iterations.shape == (3,)


def test_anderson_needs_fewer_iterations_than_plain_iteration():
    f, z_star = linear_contraction(rho=0.97)
    z0 = torch.zeros_like(z_star)
    _, sa = anderson(f, z0, tol=1e-8, max_iter=3000, m=5)
    _, sf = fixed_point(f, z0, tol=1e-8, max_iter=3000)
    assert (sa.iterations * 3 < sf.iterations).all(), (sa.iterations, sf.iterations)


def test_iterations_and_stop_are_per_sample():
    f1, _ = linear_contraction(B=1, rho=0.5, seed=1)
    f2, _ = linear_contraction(B=1, rho=0.95, seed=2)
    f = lambda z: torch.cat([f1(z[:1]), f2(z[1:])])  # noqa: E731
    _, stats = fixed_point(f, torch.zeros(2, 40, dtype=D), tol=1e-8, max_iter=3000)
    assert stats.iterations[0] < stats.iterations[1] / 3


def test_max_iter_caps_and_reports_unconverged():
    f, _ = linear_contraction(rho=0.99)
    _, stats = anderson(f, torch.zeros(3, 40, dtype=D), tol=1e-14, max_iter=4)
    assert (stats.iterations == 4).all() and (stats.residual > 1e-14).all()


def test_divergence_guard_flags_only_exploding_samples():
    def f(z):
        out = 0.5 * z + 1.0
        out[1] = 3.0 * z[1] + 1.0  # sample 1 explodes
        return out

    z, stats = fixed_point(f, torch.zeros(3, 10, dtype=D), tol=1e-8, max_iter=200, bound=1e6)
    assert stats.diverged.tolist() == [False, True, False]
    assert torch.isfinite(z).all()
    z, stats = anderson(f, torch.zeros(3, 10, dtype=D), tol=1e-8, max_iter=200, bound=1e6, beta=1.0, m=1)
    assert stats.diverged[1] and torch.isfinite(z).all() and not stats.diverged[[0, 2]].any()


def _tiny_degrad(backward="jfb", dtype=D, gamma=0.9):
    torch.manual_seed(0)
    net = DnCNN(3, depth=3, width=8, spectral_norm=True, gamma=gamma).to(dtype)
    return DEGRAD(net, solver={"name": "anderson", "tol": 1e-10, "max_iter": 400},
                  backward={"mode": backward}, reg_weight=0.5)


def _meas(dtype=D):
    x = torch.rand(2, 3, 12, 12, dtype=dtype, generator=torch.Generator().manual_seed(3))
    return x, Deblur(kernel_size=5, variance=1.0, channels=3).sample(x, seeds=torch.tensor([0, 1]))


def test_jfb_gradient_is_one_differentiable_step_at_the_fixed_point():
    m = _tiny_degrad().eval()  # eval: spectral norm does no power-iteration step per call, so the
    x, meas = _meas()            # reference below sees exactly the weights of the solve
    rec = m(meas)
    x_hat, stats = rec.x, rec.stats
    loss = ((x_hat - x) ** 2).sum()
    g_jfb = torch.autograd.grad(loss, list(m.parameters()))
    # reference: autograd of one T step from the (detached) fixed point
    eta = m.step_size(meas, x_hat)
    z_star = x_hat.detach()
    ref = ((m.T(z_star, meas, eta) - x) ** 2).sum()
    g_ref = torch.autograd.grad(ref, list(m.parameters()))
    for a, b in zip(g_jfb, g_ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10)
    assert (stats.residual < 1e-9).all()


def test_degrad_is_a_contraction_with_spectral_norm():
    m = _tiny_degrad(gamma=0.99)
    _, meas = _meas()
    eta = m.step_size(meas, meas.y)
    g = torch.Generator().manual_seed(5)
    ratios = []
    with torch.no_grad():
        for _ in range(50):
            a = torch.randn(meas.y.shape, generator=g, dtype=D) * torch.rand(1, generator=g, dtype=D)
            b = a + torch.randn(meas.y.shape, generator=g, dtype=D) * 10 ** (-4 * torch.rand(1, generator=g).item())
            ratios.append(((m.T(a, meas, eta) - m.T(b, meas, eta)).flatten(1).norm(dim=1)
                           / (a - b).flatten(1).norm(dim=1)).max().item())
    gamma_bound = 1 - eta.max().item() * m.reg_weight.item() * (1 - 0.99 ** 3)
    assert max(ratios) < 1.0
    assert max(ratios) <= gamma_bound + 1e-9, (max(ratios), gamma_bound)


def test_equilibrium_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown forward solver"):
        equilibrium(lambda z: z, torch.zeros(1, 2), forward="newton")
    with pytest.raises(ValueError, match="unknown backward mode"):
        equilibrium(lambda z: z, torch.zeros(1, 2), backward="magic")


def test_training_mode_solves_one_fixed_map():
    """Spectral norm updates its estimate at each forward in training mode; the solve must
    still see one map, so the returned point is a fixed point of the map used for the output."""
    m = _tiny_degrad().train()
    _, meas = _meas()
    rec = m(meas)
    x_hat, stats = rec.x, rec.stats
    assert (stats.residual < 1e-9).all()
    assert x_hat.requires_grad


class _Counted:
    """A map that counts its evaluations: a refused call must fail before any iterate is formed."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


def _half(z):
    return 0.5 * z + 1.0


_Z = torch.zeros(2, 3)
BAD_EQUILIBRIUM_CALLS = [  # (f, z0, keyword arguments, message, evaluations of f before the error)
    (lambda z: torch.cat([z, z], 1), _Z, {}, r"f must return a tensor shaped like its input \(2, 3\), it returned "
                                             r"shape \(2, 6\)", 1),
    (lambda z: (z, z), _Z, {}, r"f must return one tensor .*returned a tuple", 1),
    (lambda z: (z, z), _Z, {"backward": "unroll"}, r"f must return one tensor .*returned a tuple", 1),
    (lambda z: z[:1], _Z, {}, "returned a batch of 1 for a batch of 2", 1),
    (lambda z: z[:1], _Z, {"backward": "implicit"}, "returned a batch of 1 for a batch of 2", 1),
    # the same number of elements: broyden's flattening would take it without the check
    (lambda z: z.reshape(2, 3, 2), torch.zeros(2, 2, 3), {"forward": "broyden"}, r"returned shape \(2, 3, 2\)", 1),
    (lambda z: z.double(), _Z, {}, "f must return z0's dtype torch.float32, it returned torch.float64", 1),
    ("not a map", _Z, {}, "f must be a callable", 0),
    (_half, torch.zeros(3), {}, r"z0 must be batched.*got shape \(3,\)", 0),
    (_half, torch.zeros(2, 3, dtype=torch.long), {}, "z0 must be a floating-point tensor.*torch.int64", 0),
    (_half, [[0.0, 0.0]], {}, "z0 must be a tensor", 0),
    (_half, torch.zeros(0, 3), {}, r"z0 is empty \(shape \(0, 3\)\)", 0),
    (_half, torch.zeros(2, 0), {}, r"z0 is empty", 0),
    (_half, _Z, {"tol": "1e-3"}, "tol must be >= 0 and finite.*'1e-3'", 0),
    (_half, _Z, {"tol": float("inf")}, "tol must be >= 0 and finite", 0),
    (_half, _Z, {"tol": float("nan")}, "tol must be >= 0 and finite", 0),
    (_half, _Z, {"tol": -1e-3}, "tol must be >= 0 and finite", 0),
    (_half, _Z, {"tol": True}, "tol must be >= 0 and finite", 0),
    (_half, _Z, {"max_iter": 0}, "max_iter must be an integer >= 1, got 0", 0),
    (_half, _Z, {"max_iter": 2.5}, "max_iter must be an integer >= 1, got 2.5", 0),
    (_half, _Z, {"max_iter": True}, "max_iter must be an integer >= 1", 0),
]


@pytest.mark.parametrize("f,z0,kw,message,calls", BAD_EQUILIBRIUM_CALLS,
                         ids=[f"{i}-{c[3][:30]}" for i, c in enumerate(BAD_EQUILIBRIUM_CALLS)])
def test_equilibrium_refuses_bad_arguments_before_iterating(f, z0, kw, message, calls):
    counted = _Counted(f) if callable(f) else f
    with pytest.raises(ValueError, match="^equilibrium: .*" + message):
        equilibrium(counted, z0, **kw)
    assert getattr(counted, "calls", 0) == calls


def test_tol_zero_runs_every_sample_to_max_iter_and_reports_it_capped():
    """z_k = 2 - 2^(1-k) for f(z) = z/2 + 1 from 0 never reaches a residual of 0 in float64 within 7 steps."""
    z, stats = equilibrium(_half, torch.zeros(2, 3, dtype=D), forward="fixed_point", tol=0, max_iter=7)
    assert (stats.iterations == 7).all() and not stats.converged.any()
    torch.testing.assert_close(z, torch.full((2, 3), 2 - 2.0 ** -7, dtype=D))
