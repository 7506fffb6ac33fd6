"""Every option is used or refused: bad solver/backward values, typos, methods without a fixed point,
and the guard that keeps one exploding sample from poisoning the others' gradient."""
from __future__ import annotations

import hydra
import pytest
import torch

from conftest import compose_cfg
from jfb_ip.lit.checks import check_run_config
from jfb_ip.lit.errors import ConfigError
from jfb_ip.solvers import BACKWARD_MODES, equilibrium


def contraction(z):
    return 0.5 * z + 1.0


@pytest.mark.parametrize("kwargs,match", [
    ({"max_iter": 0}, "max_iter must be an integer >= 1"),
    ({"tol": -1.0}, "tol must be >= 0"),
    ({"tol": float("nan")}, "tol must be >= 0"),
    ({"tolerance": 1e-3}, r"takes no option\(s\) \['tolerance'\]"),
    ({"forward": "fixed_point", "m": 5}, r"forward solver 'fixed_point' takes no option\(s\) \['m'\]"),
    ({"forward": "broyden", "m": 5}, r"takes no option\(s\) \['m'\]"),
    ({"m": 0}, "memory m must be an integer >= 1"),
    ({"beta": 0.0}, r"beta must lie in \(0, 1\]"),
    ({"backward": "neumann", "backward_options": {"neumann_k": -1}}, "neumann_k must be an integer >= 0"),
    ({"backward": "unroll", "backward_options": {"unroll_steps": 0}}, "unroll_steps must be an integer >= 1"),
    ({"backward": "phantom", "backward_options": {"phantom_damping": 0.0}}, r"phantom_damping must lie in \(0, 1\]"),
    ({"backward": "phantom", "backward_options": {"phantom_k": 0}}, "phantom_k must be an integer >= 1"),
    ({"backward": "implicit", "backward_options": {"backward_max_iter": 0}}, "max_iter must be an integer >= 1"),
])
def test_bad_options_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        equilibrium(contraction, torch.zeros(2, 3), **kwargs)


def test_backward_tol_defaults_to_the_forward_tol_and_can_be_set():
    w = torch.tensor(0.5, requires_grad=True)
    f = lambda z: w * z + 1.0  # noqa: E731
    z, loose = equilibrium(f, torch.zeros(2, 3), backward="implicit", tol=1e-2, max_iter=200)
    z.sum().backward()
    z, tight = equilibrium(f, torch.zeros(2, 3), backward="implicit", tol=1e-2, max_iter=200,
                           backward_options={"backward_tol": 1e-10, "backward_solver": "fixed_point"})
    z.sum().backward()
    assert (loose.backward_residual <= 1e-2).all() and (loose.backward_residual > 1e-10).all()
    assert (tight.backward_residual <= 1e-10).all()


def test_a_capped_solve_is_not_reported_as_converged():
    f = lambda z: 0.99 * z + 1.0  # noqa: E731  (fixed point 100, slow to reach by plain iteration)
    _, capped = equilibrium(f, torch.zeros(2, 3), forward="fixed_point", tol=1e-8, max_iter=5)
    assert (capped.iterations == 5).all() and not capped.converged.any()
    assert capped.summary()["solver/converged_fraction"] == 0.0
    _, done = equilibrium(f, torch.zeros(2, 3), forward="anderson", tol=1e-8, max_iter=50)
    assert done.converged.all() and (done.iterations < 50).all()


def test_training_solves_stop_at_train_tol_and_the_rest_at_tol():
    """Plain iteration on f(z) = z/2 + 1 from 0: z_k = 2 - 2^(1-k), so ||f(z_k) - z_k|| / ||f(z_k)|| =
    2^-k / (2 - 2^-k), first <= 1e-2 at k = 6 and <= 1e-4 at k = 13: a training solve takes 7 fewer iterations."""
    from jfb_ip.methods.base import Equilibrium

    solve = Equilibrium({"name": "fixed_point", "tol": 1e-4, "max_iter": 50, "train_tol": 1e-2}, {"mode": "jfb"})
    _, train = solve(contraction, torch.zeros(2, 3), training=True)
    _, test = solve(contraction, torch.zeros(2, 3))
    assert (test.iterations - train.iterations == 13 - 6).all()
    assert (train.residual <= 1e-2).all() and (train.residual > 1e-4).all() and (test.residual <= 1e-4).all()
    assert train.converged.all() and test.converged.all()
    _, same = Equilibrium({"name": "fixed_point", "tol": 1e-4, "max_iter": 50, "train_tol": None},
                          {"mode": "jfb"})(contraction, torch.zeros(2, 3), training=True)
    assert torch.equal(same.iterations, test.iterations)  # null: training solves to tol


def test_methods_solve_to_train_tol_in_training_mode(tmp_path):
    from jfb_ip.data import NaturalImages

    for method in ("degrad", "luser_sw"):
        cfg = compose_cfg("train", [f"method={method}", "solver.tol=1e-5", "solver.train_tol=0.05",
                                    "solver.max_iter=200"], tmp_path)
        torch.manual_seed(0)
        m = hydra.utils.instantiate(cfg.method, _convert_="all")
        ds = NaturalImages("val", 32, 3, eval_crops=2)
        meas = hydra.utils.instantiate(cfg.task).sample(torch.stack([ds[i][0] for i in range(2)]),
                                                        seeds=torch.arange(2))
        residuals = {}
        for training in (True, False):
            m.train(training)
            with torch.no_grad():
                stats = m(meas).stats
            parts = stats.parts or [stats]
            residuals[training] = torch.stack([p.residual for p in parts])
            assert all(p.converged.all() for p in parts), method
        assert (residuals[False] <= 1e-5).all() and (residuals[True] <= 0.05).all(), method
        assert residuals[True].max() > 1e-5, method  # the training solves stopped early


@pytest.mark.parametrize("mode", sorted(BACKWARD_MODES))
def test_one_exploding_sample_leaves_the_others_gradient_finite(mode):
    """Sample 1 of f(z) = a_i z + w x explodes (a_1 = 3); masking it out of the loss must leave a finite
    gradient equal to the one of the batch without it."""
    a = torch.tensor([0.5, 3.0, 0.5]).reshape(-1, 1)
    x = torch.ones(3, 4)

    def grad(rows):
        w = torch.tensor(0.3, requires_grad=True)
        z, stats = equilibrium(lambda z: a[rows] * z + w * x[rows], torch.zeros(len(rows), 4), forward="fixed_point",
                               backward=mode, tol=1e-10, max_iter=300, bound=1e6)
        keep = ~stats.diverged
        (z[keep] ** 2).sum().backward()
        return w.grad, stats

    g_all, stats = grad([0, 1, 2])
    g_clean, _ = grad([0, 2])
    assert stats.diverged.tolist() == [False, True, False]
    assert torch.isfinite(g_all) and torch.allclose(g_all, g_clean, rtol=1e-4)


def test_lu_dncnn_refuses_backward_and_solver_options(tmp_path):
    for extra, match in ((["backward.unroll_steps=5"], "takes no backward options"),
                         (["backward=neumann"], "backward=neumann cannot apply")):
        cfg = compose_cfg("train", ["method=lu_dncnn", *extra], tmp_path)
        with pytest.raises(Exception, match=match):
            hydra.utils.instantiate(cfg.method, _convert_="all")
    # LU-DnCNN composes no solver, so a solver= choice is refused by the run's config check, before anything is built
    cfg = compose_cfg("train", ["method=lu_dncnn", "solver=broyden"], tmp_path)
    with pytest.raises(ConfigError, match="solver=broyden cannot apply"):
        check_run_config(cfg)


def test_solver_group_reaches_the_method(tmp_path):
    cfg = compose_cfg("train", ["method=luser_dw", "solver=broyden", "solver.memory=7", "solver.max_iter=9"], tmp_path)
    method = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert (method.solve.forward, method.solve.max_iter, method.solve.solver_options["memory"]) == ("broyden", 9, 7)
    cfg = compose_cfg("train", ["solver=fixed_point", "+solver.m=5"], tmp_path)
    with pytest.raises(Exception, match=r"'fixed_point' takes no option\(s\) \['m'\]"):
        hydra.utils.instantiate(cfg.method, _convert_="all")


def test_bad_values_fail_when_the_method_is_built(tmp_path):
    for extra, match in ((["solver.max_iter=0"], "max_iter must be"), (["solver.tol=-1"], "tol must be"),
                         (["backward=neumann", "backward.neumann_k=-1"], "neumann_k must be"),
                         (["solver.train_tol=-1"], "solver.train_tol must be")):
        cfg = compose_cfg("train", extra, tmp_path)
        with pytest.raises(Exception, match=match):
            hydra.utils.instantiate(cfg.method, _convert_="all")
