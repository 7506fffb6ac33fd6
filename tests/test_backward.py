"""Backward modes on a tiny float64 DE-GRAD: exactness, convergence, and every option used."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY
from jfb_ip.methods import DEGRAD
from jfb_ip.nets import DnCNN
from jfb_ip.physics import Deblur
from jfb_ip.solvers import equilibrium

D = torch.float64


def make(mode="implicit", solver=None, **bw):
    torch.manual_seed(0)
    net = DnCNN(3, depth=3, width=6, spectral_norm=True, gamma=0.9).to(D)
    # smooth (and still 1-Lipschitz) activations: ReLU kinks would make finite differences
    # of the loss jump at the 1e-4 scale on such tiny images
    for i, layer in enumerate(net.body):
        if isinstance(layer, torch.nn.ReLU):
            net.body[i] = torch.nn.Tanh()
    solver = {"name": "anderson", "tol": 1e-12, "max_iter": 500, **(solver or {})}
    m = DEGRAD(net, solver=solver, backward={"mode": mode, **bw}, reg_weight=0.5).to(D).eval()
    return m


@pytest.fixture(scope="module")
def data():
    x = torch.rand(2, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(1))
    return x, Deblur(kernel_size=5, variance=1.0, channels=3).sample(x, seeds=torch.tensor([3, 4]))


def grads(m, data):
    x, meas = data
    rec = m(meas)
    loss = ((rec.x - x) ** 2).sum()
    params = [p for p in m.parameters() if p.requires_grad]
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in params])
    m.zero_grad()
    return g, rec.solver_stats()


def loss_at(m, data):
    x, meas = data
    with torch.no_grad():
        return ((m(meas).x - x) ** 2).sum()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def g_implicit(data):
    return grads(make("implicit", backward_tol=1e-12, backward_max_iter=500), data)[0]


def test_implicit_matches_finite_differences(data, g_implicit):
    m = make("implicit")
    params = [p for p in m.parameters() if p.requires_grad]
    v = [torch.randn_like(p, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
        lp = loss_at(m, data)
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
        lm = loss_at(m, data)
        for p, d in zip(params, v):
            p.add_(eps * d)
    fd = (lp - lm) / (2 * eps)
    directional = (g_implicit * torch.cat([d.flatten() for d in v])).sum()
    assert abs(fd - directional) / abs(fd) < 1e-5, (fd.item(), directional.item())


def test_implicit_matches_long_unroll(data, g_implicit):
    g_unroll, _ = grads(make("unroll", unroll_steps=400), data)
    assert rel(g_unroll, g_implicit) < 1e-6


def test_neumann_converges_to_implicit(data, g_implicit):
    errs = [rel(grads(make("neumann", neumann_k=k), data)[0], g_implicit) for k in (0, 4, 16, 256)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-6
    g_jfb, _ = grads(make("jfb"), data)
    assert rel(g_jfb, grads(make("neumann", neumann_k=0), data)[0]) < 1e-12  # k = 0 is JFB


def test_jfb_is_a_descent_direction(data, g_implicit):
    g_jfb, _ = grads(make("jfb"), data)
    assert torch.dot(g_jfb, g_implicit) > 0


@pytest.mark.parametrize("backward_solver", ["anderson", "fixed_point", "broyden", "cg"])
def test_implicit_backward_solvers_agree(data, g_implicit, backward_solver):
    g, stats = grads(make("implicit", backward_solver=backward_solver, backward_tol=1e-11, backward_max_iter=2000), data)
    assert rel(g, g_implicit) < 1e-6
    assert stats.backward_iterations is not None and (stats.backward_residual < 1e-9).all()


def test_backward_tol_and_solver_change_the_backward_solve(data):
    _, tight = grads(make("implicit", backward_tol=1e-10), data)
    _, loose = grads(make("implicit", backward_tol=1e-3), data)
    assert (loose.backward_iterations < tight.backward_iterations).all()
    assert (loose.backward_residual > tight.backward_residual).all()
    _, fp = grads(make("implicit", backward_solver="fixed_point", backward_tol=1e-10, backward_max_iter=5000), data)
    assert (fp.backward_iterations > tight.backward_iterations).all()
    _, capped = grads(make("implicit", backward_tol=1e-12, backward_max_iter=3), data)
    assert (capped.backward_iterations == 3).all()


def test_forward_options_change_the_solve(data):
    x, meas = data
    with torch.no_grad():
        base = make("jfb", {"tol": 1e-8})(meas).stats
        assert (make("jfb", {"tol": 1e-3})(meas).stats.iterations < base.iterations).all()
        assert (make("jfb", {"tol": 1e-8, "m": 1})(meas).stats.iterations != base.iterations).any()
        assert (make("jfb", {"tol": 1e-8, "name": "fixed_point"})(meas).stats.iterations > base.iterations).all()
        assert (make("jfb", {"tol": 1e-8, "name": "broyden"})(meas).stats.iterations != base.iterations).any()
        assert (make("jfb", {"tol": 1e-8, "max_iter": 2})(meas).stats.iterations == 2).all()
        assert (make("jfb", {"tol": 1e-8, "beta": 0.5})(meas).stats.iterations != base.iterations).any()


def test_mode_options_change_the_gradient(data):
    pairs = [("neumann", {"neumann_k": 1}, {"neumann_k": 3}), ("unroll", {"unroll_steps": 2}, {"unroll_steps": 5}),
             ("phantom", {"phantom_k": 1}, {"phantom_k": 4}), ("phantom", {"phantom_damping": 0.3},
                                                                {"phantom_damping": 0.8})]
    for mode, a, b in pairs:
        assert rel(grads(make(mode, **a), data)[0], grads(make(mode, **b), data)[0]) > 1e-6, (mode, a, b)


def test_float32_and_user_lambda():
    """equilibrium on a plain lambda over a Linear layer, float32: implicit grad = closed form."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.mul_(0.3 / torch.linalg.matrix_norm(lin.weight, 2))
    x = torch.randn(4, 6)
    z, stats = equilibrium(lambda z: lin(z) + x, torch.zeros(4, 6), backward="implicit", tol=1e-7, max_iter=200)
    assert z.dtype == torch.float32 and (stats.residual < 1e-6).all()
    z.sum().backward()
    # z* = (I - W)^{-1}(b + x): d sum(z*)/db = (I - W)^{-T} 1 summed over the batch
    W = lin.weight.detach()
    expected = 4 * torch.linalg.solve((torch.eye(6) - W).T, torch.ones(6))
    assert torch.allclose(lin.bias.grad, expected, rtol=1e-4)


@pytest.mark.integration
def test_multirun_over_backward_modes(tmp_path):
    # inject=none: with the default anchor, N = z0 + tanh(g) net(...) has g = 0 at the start, so the network gets no
    # gradient in the first step and Adam moves g by lr * sign(grad) alike in every mode: two steps could not tell
    # the modes apart
    overrides = [o for o in TINY if not o.startswith("debug=")] + ["debug=smoke", "method.inject=none"]
    r = subprocess.run([sys.executable, "train.py", "-m", "backward=jfb,implicit,neumann,unroll", *overrides,
                        f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert sorted(m["config"]["backward"]["mode"] for m in runs) == ["implicit", "jfb", "neumann", "unroll"]
    assert all(m["train"]["steps"] == 2 and m["test"]["n_images"] == 4 for m in runs)
    # the modes are not aliases: one differentiable step (jfb) and 20 unrolled ones give different models
    psnr = {m["config"]["backward"]["mode"]: m["test"]["model"]["psnr"] for m in runs}
    assert psnr["jfb"] != psnr["unroll"]


def test_unknown_backward_options_are_errors():
    f = lambda z: 0.5 * z + 1  # noqa: E731
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['neuman_k'\]"):
        equilibrium(f, torch.zeros(2, 3), backward="neumann", backward_options={"neuman_k": 3})
    with pytest.raises(ValueError, match="unknown backward_solver"):
        z, _ = equilibrium(lambda z: 0.5 * z + torch.ones(2, 3, requires_grad=True), torch.zeros(2, 3),
                           backward="implicit", backward_options={"backward_solver": "newton"})


def test_cg_backward_reports_its_own_iterations(data):
    _, stats = grads(make("implicit", backward_solver="cg", backward_tol=1e-8, backward_max_iter=500), data)
    assert (stats.backward_iterations > 0).all() and (stats.backward_iterations < 500).all()


def test_neumann_stops_each_sample_at_its_smallest_term():
    """f(z) = a z + b per sample: J = a I, so dL/db = sum_{i<=j} a^i g with g = dL/dz* = 1. Where |a| < 1 the
    terms shrink and all k are summed (a = -0.9 alternates: the sum 0.181 is smaller than its last term);
    where |a| > 1 they grow and the sum stops at the smallest term, g itself (j = 0: JFB's gradient)."""
    a = torch.tensor([-1.5, 0.5, -0.9], dtype=D).reshape(3, 1)
    b = torch.ones(3, 4, dtype=D, requires_grad=True)
    k = 3
    z, stats = equilibrium(lambda z: a * z + b, torch.zeros(3, 4, dtype=D), forward="anderson", backward="neumann",
                           backward_options={"neumann_k": k}, tol=1e-12, max_iter=50)
    assert torch.allclose(z, (b / (1 - a)).detach())  # the fixed points, also where |a| > 1
    z.sum().backward()
    used = [0, k, k]
    expected = torch.tensor([sum(float(ai) ** i for i in range(j + 1)) for ai, j in zip(a.flatten(), used)], dtype=D)
    assert torch.allclose(b.grad, expected.reshape(3, 1).expand(3, 4))  # 1, 1.875, 0.181
    assert stats.backward_iterations.tolist() == used
    # the last term kept relative to the sum: 1 / 1, 0.125 / 1.875, 0.729 / 0.181
    assert torch.allclose(stats.backward_residual, torch.tensor([1.0, 0.125 / 1.875, 0.729 / 0.181], dtype=D))
