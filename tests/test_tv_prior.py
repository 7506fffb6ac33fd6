"""DE-GRAD's gradient-form priors: the smoothed TV gradient, the TNRD regulariser net, and the equilibria they start
from (the smoothed TV solution), checked against autograd, closed forms and a separate solver."""
from __future__ import annotations

import math

import pytest
import torch

from jfb_ip.methods import DEGRAD
from jfb_ip.methods.degrad import smoothed_tv, smoothed_tv_gradient, smoothed_tv_solve
from jfb_ip.nets import TNRD, DnCNN, count_parameters
from jfb_ip.physics import Deblur, Inpaint, SuperResolution

D = torch.float64
SOLVER = {"name": "anderson", "tol": 1e-11, "max_iter": 400}
TASKS = {"deblur": lambda: Deblur(kernel_size=5, channels=1), "inpaint": lambda: Inpaint(p_drop=0.5, channels=1),
         "sr2": lambda: SuperResolution(factor=2, channels=1)}


def smooth_image(b=2, c=1, h=12, w=10, seed=0):
    """Piecewise-smooth test images: a few flat blocks, a ramp and seeded noise (TV has something to do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, c, h, w, dtype=D)
    x[..., 2:8, 2:6] = 0.8
    x[..., 6:, 5:] += torch.linspace(0, 0.5, w - 5, dtype=D)
    return (x + 0.05 * torch.randn(x.shape, generator=g, dtype=D)).clamp(0, 1)


def energy_minimiser(meas, alpha, eps, x0):
    """argmin 1/2 ||Ax - y||^2 + alpha L TV_eps(x) by L-BFGS on the energy itself (autograd): a separate solver."""
    L = meas.lambda_max().to(D)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=2000, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        e = (0.5 * (meas.A(x) - meas.y).flatten(1).square().sum(1) + alpha * L * smoothed_tv(x, eps)).sum()
        e.backward()
        return e

    opt.step(closure)
    return x.detach()


def test_smoothed_tv_gradient_is_the_energy_gradient():
    """grad TV_eps written out (-div(grad x / |grad x|_eps)) against autograd of TV_eps and a central difference."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 7, dtype=D, requires_grad=True)
    for eps in (1e-2, 0.3):
        auto = torch.autograd.grad(smoothed_tv(x, eps).sum(), x)[0]
        assert torch.allclose(smoothed_tv_gradient(x, eps), auto, atol=1e-12)
        v = torch.randn_like(x)
        h = 1e-6
        with torch.no_grad():
            fd = (smoothed_tv(x + h * v, eps) - smoothed_tv(x - h * v, eps)).sum() / (2 * h)
        assert abs(float(fd) - float((auto * v).sum())) < 1e-6 * float(auto.norm() * v.norm())
    # TV_eps -> TV as eps -> 0, and a constant image has none
    from jfb_ip.methods.tv import tv_norm
    assert torch.allclose(smoothed_tv(x.detach(), 1e-9), tv_norm(x.detach()), rtol=1e-6)
    assert float(smoothed_tv(torch.full((1, 1, 5, 5), 0.3, dtype=D), 0.1).abs().max()) < 1e-15


@pytest.mark.parametrize("padding", ["circular", "zeros"])
@pytest.mark.parametrize("channels", [1, 3])
def test_tnrd_output_is_the_gradient_of_its_energy(padding, channels):
    """R(x) = sum_k K_k^T phi_k(K_k x) against autograd of E(x) = sum_k sum_p rho_k((K_k x)_p), with every part of
    the influence functions switched on (odd image sizes, so no symmetry hides a wrong adjoint)."""
    torch.manual_seed(1)
    net = TNRD(channels, n_filters=2 * channels + 3, kernel_size=5, n_knots=9, knot_range=0.3, padding=padding).to(D)
    with torch.no_grad():
        net.knot_gain.normal_(0, 10.0)
        net.sign_gain.normal_(0, 10.0)
        net.filters.normal_(0, 0.3)
    x = torch.rand(2, channels, 11, 9, dtype=D, requires_grad=True)
    auto = torch.autograd.grad(net.energy(x).sum(), x)[0]
    assert float(auto.abs().max()) > 1e-3
    assert torch.allclose(net(x), auto, atol=1e-12)


def test_tnrd_starts_as_smoothed_anisotropic_tv():
    """The untrained TNRD is weight x the gradient of sum |dy|_eps + |dx|_eps with circular forward differences,
    written here with torch.roll (not the net's filters); constants carry no energy, the filters are zero-mean."""
    torch.manual_seed(2)
    weight, eps = 2e-3, 0.05
    net = TNRD(3, n_filters=12, kernel_size=7, weight=weight, eps=eps).to(D)
    assert torch.equal(net.sign_gain[6:], torch.zeros(6, dtype=D)) and torch.equal(net.sign_gain[:6], torch.ones(6, dtype=D))
    x = torch.rand(2, 3, 10, 13, dtype=D, requires_grad=True)

    def aniso(z):
        dy, dx = z.roll(-1, -2) - z, z.roll(-1, -1) - z
        return weight * (((dy.square() + eps ** 2).sqrt() - eps) + ((dx.square() + eps ** 2).sqrt() - eps)).sum()

    assert torch.allclose(net(x), torch.autograd.grad(aniso(x), x)[0], atol=1e-13)
    assert torch.allclose(net.energy(x).sum(), aniso(x), rtol=1e-12)
    assert float(net.kernels().detach().flatten(1).sum(1).abs().max()) < 1e-12
    assert float(net(torch.full((1, 3, 8, 8), 0.4, dtype=D)).abs().max()) < 1e-15
    # the default size is the "about 10^4 parameters" of Chen & Pock's [13] stages
    assert 5_000 < count_parameters(TNRD(3)) < 20_000


def test_tnrd_curvature_bounds_its_jacobian():
    """curvature() >= ||J_R(x)|| (power iteration on the Jacobian by autograd) for trained-looking weights, and is
    8 weight / eps (the smoothed TV's own bound) at initialisation."""
    net = TNRD(1, n_filters=6, kernel_size=5, weight=1e-3, eps=0.03).to(D)
    assert abs(float(net.curvature()) / (8e-3 / 0.03) - 1) < 1e-6  # float32 filters
    torch.manual_seed(3)
    with torch.no_grad():
        net.knot_gain.normal_(0, 10.0)
        net.filters.normal_(0, 0.3)
    bound = float(net.curvature())
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = 0.5 + 0.01 * torch.randn(1, 1, 12, 12, generator=g, dtype=D)  # flat: where the curvature is largest
        v = torch.randn(x.shape, generator=g, dtype=D)
        for _ in range(30):
            v = v / v.norm()
            jv = torch.autograd.functional.jvp(net, x, v)[1]
            v = torch.autograd.functional.vjp(net, x, jv)[1]
        sigma = float(v.norm().sqrt())
        assert 0.05 * bound < sigma <= bound * (1 + 1e-6), (sigma, bound)


@pytest.mark.parametrize("task,inject", [("deblur", "none"), ("inpaint", "input"), ("sr2", "input")])
def test_tv_prior_starts_at_the_smoothed_tv_minimiser(task, inject):
    """tv_prior, gate 0: the equilibrium of both data steps satisfies the optimality condition of
    1/2 ||Ax - y||^2 + alpha L TV_eps(x) (its gradient from autograd of that energy) and is the minimiser L-BFGS
    finds; the network, random and far from zero, takes no part."""
    torch.manual_seed(0)
    alpha, eps = 5e-3, 0.1
    x_true = smooth_image()
    meas = TASKS[task]().sample(x_true, seeds=torch.arange(2))
    cin = 1 if inject == "none" else 2
    net = DnCNN(cin, 1, depth=3, width=8).to(D)
    out = {}
    for step in ("gradient", "prox"):
        m = DEGRAD(net, solver=SOLVER, backward={"mode": "jfb"}, data_step=step, inject=inject, tv_prior=True,
                   tv_weight=alpha, tv_eps=eps, reg_relative=True).to(D).eval()
        with torch.no_grad():
            rec = m(meas)
        assert bool(rec.stats.converged.all()), (step, rec.stats.residual)
        out[step] = rec.x
    z = out["prox"].clone().requires_grad_(True)
    L = meas.lambda_max().to(D)
    energy = (0.5 * (meas.A(z) - meas.y).flatten(1).square().sum(1) + alpha * L * smoothed_tv(z, eps)).sum()
    opt = torch.autograd.grad(energy, z)[0]
    assert float(opt.norm() / meas.A_adjoint(meas.y).norm()) < 1e-8
    assert torch.allclose(out["gradient"], out["prox"], atol=1e-7)
    ref = energy_minimiser(meas, alpha, eps, meas.init().to(D))
    assert float((ref - out["prox"]).norm() / ref.norm()) < 1e-5
    # the smooth_tv initializer solves the same problem (to its own looser tolerance)
    z0 = smoothed_tv_solve(meas, alpha, eps, tol=1e-9, max_iter=400, prox=meas.physics.prox_is_closed_form())
    assert float((z0 - ref).norm() / ref.norm()) < 1e-5


def test_tv_prior_learns_alpha_and_opens_the_gate():
    """JFB's one differentiable step reaches alpha (log-parametrised) and the gate; the network's own weights only
    once the gate is open (ReZero)."""
    torch.manual_seed(0)
    x = smooth_image()
    meas = TASKS["deblur"]().sample(x, seeds=torch.arange(2))
    m = DEGRAD(DnCNN(2, 1, depth=3, width=8), solver={"name": "anderson", "tol": 1e-6, "max_iter": 200},
               backward={"mode": "jfb"}, data_step="prox", inject="input", tv_prior=True, reg_relative=True).to(D)
    assert abs(float(m.tv_alpha) / 1e-3 - 1) < 1e-6 and float(m.anchor_gate) == 0.0
    (m(meas).x - x).square().sum().backward()
    assert float(m.tv_log_weight.grad.abs()) > 0 and float(m.anchor_gate.grad.abs()) > 0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in m.net.parameters())
    frozen = DEGRAD(DnCNN(1, 1, depth=3, width=8), solver=SOLVER, backward={"mode": "jfb"}, tv_prior=True,
                    learn_tv_weight=False)
    assert not frozen.tv_log_weight.requires_grad


@pytest.mark.parametrize("task", ["deblur", "sr2"])
def test_tnrd_in_degrad_starts_at_the_anisotropic_tv_minimiser(task):
    """A gradient-form net: S(x) = L R(x), so the untrained equilibrium satisfies A^T(Ax - y) + L grad E(x) = 0 with
    grad E by autograd of the net's energy (smoothed anisotropic TV)."""
    torch.manual_seed(0)
    x = smooth_image()
    meas = TASKS[task]().sample(x, seeds=torch.arange(2))
    net = TNRD(1, n_filters=4, kernel_size=3, weight=5e-3, eps=0.1).to(D)
    m = DEGRAD(net, solver=SOLVER, backward={"mode": "jfb"}, data_step="prox", reg_relative=True).to(D).eval()
    assert m.anchor_gate is None
    with torch.no_grad():
        rec = m(meas)
    assert bool(rec.stats.converged.all()), rec.stats.residual
    z = rec.x.clone().requires_grad_(True)
    L = meas.lambda_max().to(D)
    energy = (0.5 * (meas.A(z) - meas.y).flatten(1).square().sum(1) + L * net.energy(z)).sum()
    opt = torch.autograd.grad(energy, z)[0]
    assert float(opt.norm() / meas.A_adjoint(meas.y).norm()) < 1e-8


def test_tv_initializers_and_refusals():
    """initializer=tv is TV's (Chambolle-Pock) solution at tv_weight, lower in TV's objective than the task's
    initializer; smooth_tv is the smoothed TV minimiser; the combinations that cannot work are refused."""
    from jfb_ip.methods.tv import tv_objective

    torch.manual_seed(0)
    x = smooth_image()
    meas = TASKS["deblur"]().sample(x, seeds=torch.arange(2))
    kw = dict(solver=SOLVER, backward={"mode": "jfb"}, tv_weight=5e-3, tv_eps=0.1)
    tv0 = DEGRAD(DnCNN(1, 1, depth=3, width=8), initializer="tv", initializer_tol=1e-6, initializer_max_iter=2000,
                 **kw).to(D).init(meas)
    L = meas.lambda_max().to(D)
    assert bool((tv_objective(meas, tv0, 5e-3 * L) < tv_objective(meas, meas.init(), 5e-3 * L)).all())
    assert bool((tv_objective(meas, tv0, 5e-3 * L) <= tv_objective(meas, tv0 + 1e-3 * torch.randn_like(tv0),
                                                                   5e-3 * L)).all())
    s0 = DEGRAD(DnCNN(1, 1, depth=3, width=8), initializer="smooth_tv", initializer_tol=1e-9, initializer_max_iter=400,
                **kw).to(D).init(meas)
    ref = energy_minimiser(meas, 5e-3, 0.1, meas.init().to(D))
    assert float((s0 - ref).norm() / ref.norm()) < 1e-5

    net = DnCNN(2, 1, depth=3, width=8)
    with pytest.raises(ValueError, match="takes the anchor's place"):
        DEGRAD(net, tv_prior=True, inject="anchor", **kw)
    with pytest.raises(ValueError, match="set method.inject=none"):
        DEGRAD(TNRD(1), inject="input", **kw)
    with pytest.raises(ValueError, match="only inject=anchor or tv_prior has"):
        DEGRAD(net, inject="input", gate_init=0.1, **kw)
    with pytest.raises(ValueError, match="tv_eps must be a finite number > 0"):
        DEGRAD(net, **{**kw, "tv_eps": 0.0})
    with pytest.raises(ValueError, match="initializer must be one of"):
        DEGRAD(net, initializer="tv_fast", **kw)
    assert math.isclose(DEGRAD(net, tv_prior=True, inject="input", gate_init=0.2, **kw).anchor_gate.item(), 0.2,
                        rel_tol=1e-6)


def test_tv_prior_and_tnrd_compose_and_train_from_the_config(tmp_path):
    """method.tv_prior=true (inject=input) and the TNRD net (replacing DnCNN's keys) compose, build and train two
    steps end to end; the learned alpha is saved with the method."""
    from conftest import TINY, compose_cfg
    from jfb_ip.lit.run import train

    cfg = compose_cfg("train", TINY + ["method.tv_prior=true", "method.inject=input", "logger=csv"], tmp_path / "tv")
    out = train(cfg)
    assert out["train"]["steps"] == 2 and math.isfinite(out["test"]["model"]["psnr"])
    sd = torch.load(tmp_path / "tv" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "method.tv_log_weight" in sd
    tiny = [o for o in TINY if not o.startswith("method.net.")]
    cfg = compose_cfg("train", tiny + ["method.inject=none", "~method.net",
                                       "+method.net={_target_:jfb_ip.nets.TNRD,channels:${data.channels},n_filters:8,"
                                       "kernel_size:3,n_knots:5}"], tmp_path / "tnrd")
    out = train(cfg)
    assert out["train"]["steps"] == 2 and math.isfinite(out["test"]["model"]["psnr"])
