"""local_lipschitz against closed forms: a batched dense linear map and tanh(Wx) (Jacobian diag(1 - tanh^2) W)."""
import pytest
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


def _dense_conv_norm(conv, shape):
    """Largest singular value of the conv (weights as they are now, bias excluded) as a dense matrix."""
    import math

    n = math.prod(shape)
    eye = torch.eye(n, dtype=D).reshape(n, *shape)
    with torch.no_grad():  # torch's own padding (zeros or circular), bias left out
        cols = conv._conv_forward(eye, conv.weight, None).flatten(1)
    return torch.linalg.matrix_norm(cols.T, ord=2).item()


@pytest.mark.parametrize("padding_mode,dilation", [("zeros", 1), ("circular", 1), ("zeros", 2), ("circular", 3)])
def test_operator_mode_normalises_the_convolution_itself_and_kernel_mode_does_not(padding_mode, dilation):
    from jfb_ip.nets import lipschitz_conv

    shape = (2, 7, 9)
    torch.manual_seed(0)
    # a kernel whose taps all agree in sign: the conv's norm is far above the reshaped matrix's
    base = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    with torch.no_grad():
        base.weight.abs_()
    kw = dict(padding=dilation, dilation=dilation, padding_mode=padding_mode)
    kernel = lipschitz_conv(torch.nn.Conv2d(2, 3, 3, **kw).double(), 0.9, "kernel")
    operator = lipschitz_conv(torch.nn.Conv2d(2, 3, 3, **kw).double(), 0.9, "operator")
    for c in (kernel, operator):
        c.parametrizations.weight.original.data.copy_(base.weight)
        for _ in range(60):  # training-mode forwards: power-iteration steps at this input size
            c(torch.zeros(1, *shape, dtype=D))
    assert _dense_conv_norm(operator, shape) == pytest.approx(0.9, rel=1e-3)
    assert _dense_conv_norm(kernel, shape) > 1.5 * 0.9  # the reshaped-matrix norm bounds nothing


def test_operator_mode_bounds_the_network_and_makes_degrad_a_contraction():
    """Lip(N) <= gamma^depth and Lip(T) <= 1 - eta lam (1 - eps) (Theorem 3.1 of Liu et al. [1]), checked
    with worst-case directions from power iteration at real inputs, after some training-mode steps."""
    from jfb_ip.methods import DEGRAD
    from jfb_ip.methods.base import fixed_weights
    from jfb_ip.nets import DnCNN
    from jfb_ip.physics import Deblur

    torch.manual_seed(0)
    depth, gamma = 4, 0.95
    net = DnCNN(3, depth=depth, width=8, spectral_norm=True, gamma=gamma, norm_mode="operator").double()
    m = DEGRAD(net, solver={"name": "anderson", "tol": 1e-8, "max_iter": 200}, backward={"mode": "jfb"},
               reg_weight=0.5).double()
    with torch.no_grad():  # weights far from their initialisation, as after training
        for p in net.parameters():
            p.mul_(3.0).add_(0.1)
    x = torch.rand(2, 3, 16, 16, dtype=D, generator=torch.Generator().manual_seed(1))
    meas = Deblur(kernel_size=5, variance=1.0, channels=3).sample(x, seeds=torch.tensor([0, 1]))
    for _ in range(30):
        m(meas)  # training mode: the persistent power-iteration vectors converge at 16x16
    m.eval()
    eta = m.step_size(meas, x)
    with fixed_weights(m):
        lip_n = local_lipschitz(net, x, n_iter=100, tol=1e-8)
        lip_t = local_lipschitz(lambda z: m.T(z, meas, eta), x, n_iter=100, tol=1e-8)
    eps = gamma ** depth
    bound_t = 1 - eta.flatten()[0] * m.reg_weight * (1 - eps)
    assert (lip_n <= eps * 1.001).all(), (lip_n, eps)
    assert (lip_t <= bound_t * 1.001).all() and (lip_t < 1).all(), (lip_t, bound_t)


@pytest.mark.parametrize("dilations,side", [(None, 17), ([1, 2, 3, 4, 4, 3, 2, 1], 41)])
def test_dncnn_receptive_field_follows_its_dilations(dilations, side):
    """The output pixel's gradient support is 1 + 2 * sum(dilations) wide (3x3 convs)."""
    from jfb_ip.nets import DnCNN

    torch.manual_seed(0)
    net = DnCNN(1, depth=8, width=4, dilations=dilations).double()
    x = torch.rand(1, 1, 64, 64, dtype=D, requires_grad=True)
    net(x)[0, 0, 32, 32].backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero()
    assert int(rows.max() - rows.min()) + 1 == side


def test_operator_mode_checkpoint_loads_into_a_model_last_run_at_another_size():
    """The power-iteration vector is saved at the training size; a fresh model (run at another size)
    loads it and then computes the same function as the saved one, at that saved normalisation."""
    from jfb_ip.nets import DnCNN

    torch.manual_seed(0)
    trained = DnCNN(3, depth=3, width=4, spectral_norm=True, gamma=0.9, norm_mode="operator").double()
    trained(torch.rand(2, 3, 24, 24, dtype=D))
    trained.eval()
    fresh = DnCNN(3, depth=3, width=4, spectral_norm=True, gamma=0.9, norm_mode="operator").double()
    fresh(torch.rand(1, 3, 16, 16, dtype=D))
    fresh.load_state_dict(trained.state_dict())
    fresh.eval()
    x = torch.rand(1, 3, 24, 24, dtype=D)
    assert torch.equal(fresh(x), trained(x))
