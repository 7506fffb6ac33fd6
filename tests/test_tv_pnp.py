"""TV (Chambolle-Pock) and PnP-ADMM checked against dense solves, and both run through evaluate.py without
a checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jfb_ip import stored_tv_weight, tv_weight_path
from jfb_ip.bench.tv_weights import TASKS
from jfb_ip.checkpoint import load_network
from jfb_ip.methods import PnPADMM
from jfb_ip.physics import (CT, Deblur, Downsampling, GaussianBlur, Identity, Inpaint, Inpainting, Measurement, MRI,
                            MultiTask, SuperResolution)
from test_physics_operators import dense

F64 = torch.float64


class IdentityDenoiser(nn.Module):
    """D(v, sigma) = v: PnP-ADMM then minimises the data term alone."""

    def forward(self, x, sigma):
        return x


def _meas(op, x_shape, noise=0.01, seed=0) -> Measurement:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(x_shape, generator=g, dtype=F64)
    y = op.A(x)
    y = y + noise * torch.randn(y.shape, generator=g, dtype=F64)
    return Measurement(y=y, physics=op, sigma=torch.full((x_shape[0],), noise, dtype=F64), x_shape=torch.Size(x_shape))


# operators with the data prox in closed form and with the CG fallback (zero-padded blur, CT)
OPS = {"blur circular": lambda s: GaussianBlur.from_std(5, 0.7, "circular", dtype=F64),
       "blur zeros (CG)": lambda s: GaussianBlur.from_std(3, 0.6, "zeros", dtype=F64),
       "inpaint": lambda s: Inpainting.random(s, 0.5, torch.Generator().manual_seed(1), dtype=F64),
       "sr x2": lambda s: Downsampling(2),
       "mri": lambda s: MRI.random(s, 2, generator=torch.Generator().manual_seed(2), dtype=F64),
       "ct (CG)": lambda s: CT.parallel_beam(s[-2:], n_angles=5),
       "identity": lambda s: Identity()}


@pytest.mark.parametrize("name", OPS)
def test_pnp_one_iteration_with_identity_denoiser_is_a_dense_tikhonov_solve(name):
    """n_iter = 1: x_1 = (A^T A + rho_0 I)^{-1}(A^T y + rho_0 x_0), rho_0 = lam s^2 / sigma_max^2 (DPIR's coupling),
    and z_1 = D(x_1) = x_1."""
    shape = (1, 1, 6, 6)
    op = OPS[name](shape)
    noise = 0.02 * (shape[-1] if name.startswith("ct") else 1)  # the CT task's noise scales with the image side
    meas = _meas(op, shape, noise=noise)
    pnp = PnPADMM(IdentityDenoiser(), n_iter=1, sigma_max=0.1, lam=0.3, lambda_grid=[])
    out = pnp(meas).x
    A = dense(op.A, shape)
    rho = 0.3 * noise ** 2 / 0.1 ** 2
    x0 = meas.init().flatten()
    ref = torch.linalg.solve(A.T @ A + rho * torch.eye(A.shape[1], dtype=F64), A.T @ meas.y.flatten() + rho * x0)
    # CG (prox_data defaults: relative residual 1e-6) leaves an error the condition number amplifies
    assert torch.allclose(out.flatten(), ref, atol=1e-3 if "CG" in name else 1e-9)


@pytest.mark.parametrize("name", ["blur circular", "blur zeros (CG)", "identity"])
def test_pnp_with_identity_denoiser_converges_to_least_squares(name):
    """Invertible A: the proximal-point iterations the identity 'denoiser' leaves tend to A^{-1} y (dense solve)."""
    shape = (2, 1, 6, 7)
    op = OPS[name](shape)
    meas = _meas(op, shape)
    A = dense(op.A, shape)
    assert torch.linalg.matrix_rank(A) == A.shape[1]
    pnp = PnPADMM(IdentityDenoiser(), n_iter=40, sigma_max=0.1, sigma_min=0.1, lam=0.01, lambda_grid=[])
    out = pnp(meas).x
    for i in range(shape[0]):
        ref = torch.linalg.solve(A, meas.y[i].flatten())
        assert torch.allclose(out[i].flatten(), ref, atol=1e-4 if "CG" in name else 1e-6)


def test_pnp_schedule_is_log_spaced_with_dpir_rho():
    meas = _meas(Identity(), (3, 1, 4, 4))
    meas.sigma = torch.tensor([0.0, 0.01, 0.5], dtype=F64)
    pnp = PnPADMM(IdentityDenoiser(), n_iter=5, sigma_max=0.2, lam=0.23, lambda_grid=[])
    sigmas, rhos = pnp.schedule(meas, 0.23)
    # the last strength is the noise level, clamped to [noise_floor, sigma_max]
    assert torch.allclose(sigmas[0], torch.full((3,), 0.2, dtype=F64))
    assert torch.allclose(sigmas[-1], torch.tensor([0.001, 0.01, 0.2], dtype=F64))
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, ratios[:1].expand_as(ratios))  # geometric
    s = torch.tensor([0.001, 0.01, 0.5], dtype=F64)
    assert torch.allclose(rhos, 0.23 * s ** 2 / sigmas ** 2)
    fixed = PnPADMM(IdentityDenoiser(), n_iter=3, sigma_max=0.2, sigma_min=0.02, lambda_grid=[])
    assert torch.allclose(fixed.schedule(meas, 0.23)[0][-1], torch.full((3,), 0.02, dtype=F64))


def test_pnp_admm_iterates_like_a_hand_written_admm():
    """Two iterations with a linear 'denoiser' D(v, sigma) = v / (1 + sigma) written out by hand, rescaled dual included."""
    class Shrink(nn.Module):
        def forward(self, x, sigma):
            return x / (1 + sigma.reshape(-1, 1, 1, 1))

    shape = (2, 1, 5, 5)
    op = Inpainting.random(shape, 0.4, torch.Generator().manual_seed(3), dtype=F64)
    meas = _meas(op, shape, noise=0.05)
    m = op.mask
    out = PnPADMM(Shrink(), n_iter=2, sigma_max=0.3, sigma_min=0.1, lam=0.5, lambda_grid=[])(meas).x
    rho0, rho1 = 0.5 * 0.05 ** 2 / 0.3 ** 2, 0.5 * 0.05 ** 2 / 0.1 ** 2
    z, u = meas.y, torch.zeros(shape, dtype=F64)
    x = (m * meas.y + rho0 * (z - u)) / (m + rho0)
    z = (x + u) / 1.3
    u = (u + x - z) * rho0 / rho1
    x = (m * meas.y + rho1 * (z - u)) / (m + rho1)
    z = (x + u) / 1.1
    assert torch.allclose(out, z, atol=1e-12)


def test_pnp_runs_on_a_mixed_multitask_batch():
    task = MultiTask()
    x = torch.rand(6, 3, 24, 24)
    meas = task.sample(x, seeds=torch.arange(6))
    out = PnPADMM(IdentityDenoiser(), n_iter=2, lambda_grid=[])(meas).x
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_prox_is_closed_form_never_runs_cg(monkeypatch):
    """An operator that reports a closed-form data prox (TV's primal-dual steps rely on it) computes it without CG."""
    import jfb_ip.physics.operator as operator

    def no_cg(*a, **k):
        raise AssertionError("conjugate gradient called")

    monkeypatch.setattr(operator, "conjugate_gradient", no_cg)
    shape = (2, 1, 6, 6)
    for name, make in OPS.items():
        op = make(shape)
        meas = _meas(op, shape)
        if op.prox_is_closed_form():
            meas.prox_data(meas.init(), 0.3)
        else:
            with pytest.raises(AssertionError, match="conjugate gradient"):
                meas.prox_data(meas.init(), 0.3)
    assert not GaussianBlur.from_std(3, 0.6, "zeros").prox_is_closed_form()


def test_pnp_config_errors_are_one_line():
    with pytest.raises(ValueError, match="method.denoiser is not set"):
        PnPADMM(None)
    with pytest.raises(ValueError, match="does not exist"):
        load_denoiser("/nonexistent/last.ckpt")
    with pytest.raises(ValueError, match="must be an nn.Module"):
        PnPADMM("/nonexistent/last.ckpt")
    with pytest.raises(ValueError, match="n_iter"):
        PnPADMM(IdentityDenoiser(), n_iter=0)
    with pytest.raises(ValueError, match="sigma_min <= sigma_max"):
        PnPADMM(IdentityDenoiser(), sigma_min=0.5, sigma_max=0.1)
    with pytest.raises(ValueError, match="solver=anderson cannot apply"):
        PnPADMM(IdentityDenoiser(), solver={"name": "anderson"})
    from jfb_ip.nets import NoiseConditionedUNet

    gray = _meas(Identity(), (1, 1, 8, 8))
    with pytest.raises(ValueError, match="takes 3-channel images but this task's have 1"):
        PnPADMM(NoiseConditionedUNet(3, features=[4]), lambda_grid=[])(gray)


def _fake_ckpt(path, net_cfg, state):
    torch.save({"state_dict": state, "hyper_parameters": {"run_config": {"method": {"_target_": "x", "net": net_cfg}}}},
               path)
    return path


def load_denoiser(path):
    return load_network(path, noise_conditioned=True)


def test_load_denoiser_refuses_what_it_cannot_rebuild_safely(tmp_path):
    from jfb_ip.nets import DnCNN, NoiseConditionedUNet

    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable train.py checkpoint"):
        load_denoiser(tmp_path / "junk.ckpt")
    dn = DnCNN(3, depth=2, width=4)
    cfg = {"_target_": "jfb_ip.nets.DnCNN", "in_channels": 3, "depth": 2, "width": 4}
    state = {f"method.net.{k}": v for k, v in dn.state_dict().items()}
    with pytest.raises(ValueError, match="takes no noise level"):
        load_denoiser(_fake_ckpt(tmp_path / "dncnn.ckpt", cfg, state))
    with pytest.raises(ValueError, match="not a network of jfb_ip.nets"):
        load_denoiser(_fake_ckpt(tmp_path / "evil.ckpt", {"_target_": "os.system", "command": "true"}, state))
    with pytest.raises(ValueError, match="holds no network"):
        load_denoiser(_fake_ckpt(tmp_path / "nonet.ckpt", None, {}))
    unet = NoiseConditionedUNet(3, features=[4, 8], blocks=1)
    cfg = {"_target_": "jfb_ip.nets.NoiseConditionedUNet", "channels": 3, "features": [4, 8], "blocks": 1}
    state = {f"method.net.{k}": v for k, v in unet.state_dict().items()}
    loaded = load_denoiser(_fake_ckpt(tmp_path / "unet.ckpt", cfg, state))
    x = torch.rand(2, 3, 9, 9)
    assert not loaded.training and torch.equal(loaded(x, 0.1), unet(x, 0.1))
    with pytest.raises(ValueError, match="does not build NoiseConditionedUNet"):
        load_denoiser(_fake_ckpt(tmp_path / "badarg.ckpt", {**cfg, "depth": 3}, state))
    with pytest.raises(ValueError, match="do not fit"):
        load_denoiser(_fake_ckpt(tmp_path / "wrong.ckpt", {**cfg, "features": [4, 16]}, state))


# ---------------------------------------------------------------- TV
from jfb_ip.methods import TV, tv_solve  # noqa: E402
from jfb_ip.methods.tv import divergence, gradient, tv_norm, tv_objective  # noqa: E402


def test_divergence_is_minus_the_adjoint_of_the_gradient():
    shape = (1, 2, 5, 7)
    G = dense(gradient, shape)  # (2 * n, n)
    D = dense(divergence, (1, 2, 2, 5, 7))
    assert torch.allclose(D, -G.T, atol=1e-12)
    # forward differences, Neumann: the last row/column of each direction is zero
    x = torch.rand(shape, dtype=F64)
    g = gradient(x)
    assert torch.allclose(g[:, :, 0, :-1], x[:, :, 1:] - x[:, :, :-1]) and g[:, :, 0, -1].abs().max() == 0
    assert torch.allclose(g[:, :, 1, :, :-1], x[..., 1:] - x[..., :-1]) and g[:, :, 1, :, -1].abs().max() == 0
    # ||grad||^2 < 8 (the bound the step sizes use)
    assert torch.linalg.matrix_norm(G, ord=2) ** 2 < 8


def test_tv_norm_is_isotropic_per_channel():
    x = torch.zeros(1, 2, 3, 3, dtype=F64)
    x[0, 0, 1, 1] = 1.0  # one bright pixel in channel 0
    # pixel (0,1): dy = 1; pixel (1,0): dx = 1; pixel (1,1): dy = -1, dx = -1 -> sqrt(2)
    assert tv_norm(x).item() == pytest.approx(2 + math.sqrt(2))


def test_tv_with_zero_weight_on_an_invertible_operator_is_least_squares():
    shape = (2, 1, 6, 7)
    well_conditioned = {"blur circular": GaussianBlur.from_std(3, 0.5, "circular", dtype=F64)}
    for name in ("blur circular", "identity", "blur zeros (CG)"):
        op = well_conditioned.get(name) or OPS[name](shape)
        meas = _meas(op, shape)
        A = dense(op.A, shape)
        for splitting in ("prox", "stacked"):
            if splitting == "prox" and not op.prox_is_closed_form():
                continue
            # from zero, not from y (the identity's least-squares solution itself)
            x, stats = tv_solve(meas, 0.0, tol=1e-10, max_iter=20000, splitting=splitting, x0=torch.zeros(shape, dtype=F64))
            assert stats.converged.all(), (name, splitting, stats.residual)
            for i in range(shape[0]):
                ref = torch.linalg.solve(A, meas.y[i].flatten())
                assert torch.allclose(x[i].flatten(), ref, atol=1e-6), (name, splitting)


def _smoothed_tv_reference(meas, lam, eps=1e-7, steps=400):
    """An independent solver: L-BFGS (torch.optim) on 1/2||Ax - y||^2 + lam sum sqrt(|grad x|^2 + eps^2), with its
    own finite differences, from the measurement's initial guess."""
    x = meas.init().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        dy = torch.diff(x, dim=-2)
        dx = torch.diff(x, dim=-1)
        mag = (F_pad(dy, (0, 0, 0, 1)) ** 2 + F_pad(dx, (0, 1)) ** 2 + eps ** 2).sqrt()
        f = 0.5 * (meas.A(x) - meas.y).square().sum() + lam * mag.sum()
        f.backward()
        return f

    for _ in range(5):
        opt.step(closure)
    return x.detach()


def F_pad(t, pad):
    return torch.nn.functional.pad(t, pad)


@pytest.mark.parametrize("name", ["blur circular", "inpaint", "ct (CG)"])
def test_tv_reaches_its_tolerance_and_the_minimum_an_independent_solver_finds(name):
    shape = (1, 1, 8, 8)
    op = OPS[name](shape)
    meas = _meas(op, shape, noise=0.05)
    L = meas.lambda_max()
    lam = 0.02
    x, stats = tv_solve(meas, lam, tol=1e-7, max_iter=20000)
    assert stats.converged.all() and stats.iterations.max() < 20000
    ref = _smoothed_tv_reference(meas, lam * L.item())
    f, f_ref = tv_objective(meas, x, lam * L), tv_objective(meas, ref, lam * L)
    assert f.item() <= f_ref.item() * (1 + 1e-5)  # CP's minimum is no worse than L-BFGS's
    assert (x - ref).norm() / ref.norm() < 1e-2


def test_tv_objective_decreases_along_the_iterations():
    shape = (2, 3, 16, 16)
    op = GaussianBlur.from_std(5, 1.0, "circular", dtype=F64)
    meas = _meas(op, shape, noise=0.02)
    lam = 3e-3
    ks = [0, 2, 8, 32, 128, 512]
    # the iterate after k steps: tol = 0 never stops early, and the iteration is deterministic
    objs = torch.stack([tv_objective(meas, tv_solve(meas, lam, tol=0.0, max_iter=k)[0] if k else meas.init(), lam)
                        for k in ks])
    assert (objs[1:] <= objs[:-1] * (1 + 1e-3)).all(), objs  # monotone up to CP's small oscillations
    f_star = tv_objective(meas, tv_solve(meas, lam, tol=1e-9, max_iter=20000)[0], lam)
    assert (objs[-1] <= f_star * (1 + 1e-3)).all() and (objs[0] > f_star * 1.2).all()
    x, stats = tv_solve(meas, lam, tol=1e-4, max_iter=1000)
    assert stats.converged.all() and (stats.residual < 1e-4).all()
    # a sample's result does not depend on its batch: stopped samples are frozen
    alone, _ = tv_solve(Measurement(meas.y[1:], op, meas.sigma[1:], torch.Size((1, *shape[1:]))), lam, tol=1e-4)
    assert torch.allclose(alone, x[1:], atol=1e-12)


def test_tv_capped_solve_is_reported_as_not_converged():
    shape = (1, 1, 8, 8)
    meas = _meas(OPS["blur circular"](shape), shape)
    x, stats = tv_solve(meas, 1e-2, tol=1e-12, max_iter=3)
    assert stats.iterations.tolist() == [3] and not stats.converged.any() and stats.residual.item() > 1e-12


def test_tv_denoising_of_a_step_matches_the_one_dimensional_closed_form():
    """An image constant along its rows is a stack of 1-D signals, and isotropic TV is then the 1-D TV of each column.
    1-D TV denoising of a step a (n1 samples) / b (n2 samples), a - b > lam (1/n1 + 1/n2), has the closed form
    u = a - lam / n1 on the first part, b + lam / n2 on the second (the jump shrinks, the mean stays)."""
    n1, n2, W, a, b, lam = 5, 7, 6, 0.9, 0.2, 0.3
    f = torch.cat([torch.full((n1,), a), torch.full((n2,), b)]).to(F64)
    y = f[None, None, :, None].expand(2, 1, n1 + n2, W).clone()
    meas = Measurement(y=y, physics=Identity(), sigma=torch.zeros(2, dtype=F64), x_shape=y.shape)
    x, stats = tv_solve(meas, lam, tol=1e-9, max_iter=20000)
    assert stats.converged.all()
    u = torch.cat([torch.full((n1,), a - lam / n1), torch.full((n2,), b + lam / n2)]).to(F64)
    assert torch.allclose(x, u[None, None, :, None].expand_as(x), atol=1e-6)


def test_tv_residual_is_the_stopping_rule_and_a_capped_sample_is_not_converged():
    """Per sample: converged exactly when the reported residual is under tol; a sample that ran max_iter without
    reaching it is reported not converged; a looser tol stops no later."""
    shape = (3, 1, 12, 12)
    meas = _meas(OPS["inpaint"](shape), shape, noise=0.05)
    x, stats = tv_solve(meas, 1e-2, tol=1e-3, max_iter=2000)
    assert torch.equal(stats.converged, stats.residual < 1e-3) and stats.converged.all()
    capped_at = int(stats.iterations.min()) - 1
    _, capped = tv_solve(meas, 1e-2, tol=1e-3, max_iter=capped_at)
    assert (capped.iterations == capped_at).all() and not capped.converged.any() and (capped.residual >= 1e-3).all()
    _, loose = tv_solve(meas, 1e-2, tol=1e-2, max_iter=2000)
    assert (loose.iterations <= stats.iterations).all()


def test_tv_warm_start_from_wiener_reaches_the_same_minimum():
    shape = (2, 1, 12, 12)
    meas = _meas(OPS["inpaint"](shape), shape, noise=0.02)
    cold, _ = tv_solve(meas, 3e-3, tol=1e-6, max_iter=20000)
    warm = TV(lam=3e-3, lambda_grid=[], tol=1e-6, max_iter=20000, warm_start="wiener")(meas)
    assert warm.stats.converged.all() and (warm.x - cold).norm() / cold.norm() < 1e-3


def test_tv_weight_search_finds_the_peak_of_a_unimodal_score():
    """The hill-climbing search of jfb_ip.bench.tv_weights on a score whose peak is known (a PSNR that falls off
    quadratically in log10 lam around 10^-1.625): it returns the peak on the eighth-decade grid."""
    from jfb_ip.bench.tv_weights import search
    from jfb_ip.lit.calibration import psnr_score

    x = torch.full((1, 1, 16, 16), 0.5)
    peak = -1.625

    def solve(lam, x0):  # an error growing with the distance to the peak, so PSNR peaks there
        return x + 1e-3 * (1 + (math.log10(lam) - peak) ** 2)

    best, scores = search(solve, x)
    assert best == pytest.approx(peak) and len(scores) <= 12
    assert max(scores, key=scores.get) == pytest.approx(peak) and psnr_score(solve(10 ** best, None), x) > 0


STORED = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "tv_weights").glob("*.yaml"))


def test_every_task_has_a_stored_tv_weight_on_its_default_data():
    from conftest import picks_phantoms

    assert {f"{t}_{'phantoms' if picks_phantoms(t) else 'natural'}" for t in TASKS} <= set(STORED)


@pytest.mark.parametrize("stored", STORED)
def test_every_stored_tv_weight_is_what_method_tv_and_the_tv_row_use(stored, tmp_path):
    import hydra
    from omegaconf import OmegaConf

    task, data = stored.rsplit("_", 1)
    lam = float(OmegaConf.load(tv_weight_path(task, data)).tv_weight)
    assert lam > 0 and stored_tv_weight(task, data) == lam
    for app, extra in (("train", ["logger=none", f"data={data}"]), ("evaluate", [f"data={data}"])):
        cfg = compose_cfg(app, ["method=tv", f"task={task}", *extra], tmp_path)
        tv = hydra.utils.instantiate(cfg.method)
        assert float(tv.lam) == pytest.approx(lam) and tv.lambda_grid == []  # the stored weight, no search
        row = hydra.utils.instantiate(cfg.references.tv)
        assert isinstance(row, TV) and float(row.lam) == pytest.approx(lam) and row.lambda_grid == []
    # the weight reaches DE-GRAD's TV initializers too
    assert compose_cfg("train", [f"task={task}", f"data={data}"], tmp_path).method.tv_weight == pytest.approx(lam)


@pytest.mark.parametrize("stored", STORED)
def test_every_stored_tv_weight_names_the_task_settings_of_its_pair(stored, tmp_path):
    """A stored weight records the task it was chosen for, and that is the task its pair composes to today: a change
    of conf/task/ (a noise level, a kernel) without a new search fails here."""
    from omegaconf import OmegaConf

    task, data = stored.rsplit("_", 1)
    cfg = compose_cfg("train", [f"task={task}", f"data={data}", "logger=none"], tmp_path)
    stored_file = OmegaConf.load(tv_weight_path(task, data))
    settings = OmegaConf.to_container(stored_file.tv_weight_task)
    assert settings == OmegaConf.to_container(cfg.task, resolve=True)
    assert OmegaConf.to_container(cfg.tv_weight_task) == settings  # what a run composes
    # generated data records its generator: the phantoms' style is the data set's default
    data_settings = {"style": cfg.data.dataset.style} if data == "phantoms" else {}
    assert OmegaConf.to_container(stored_file.get("tv_weight_data", OmegaConf.create())) == data_settings


def test_a_run_whose_task_settings_differ_drops_the_stored_tv_weight(tmp_path, caplog):
    """task.noise_std=0.05 is not the task TV's stored weight was chosen for: method=tv searches, the test table has no
    tv row, DE-GRAD starts from the default weight; an initializer change (task.init) keeps it."""
    import hydra

    from jfb_ip.lit.run import check_tv_weight_task, default_data
    from jfb_ip.methods.tv import default_tv_lambda_grid

    lam = stored_tv_weight("deblur", "natural")
    cfg = compose_cfg("train", ["method=tv", "task.noise_std=0.05", "logger=none"], tmp_path)
    assert cfg.tv_weight == pytest.approx(lam)  # composed: the stored file is selected by name
    with caplog.at_level("WARNING"):
        check_tv_weight_task(cfg)
    assert cfg.tv_weight is None and "task.noise_std=0.05 (stored for 0.01)" in caplog.text
    assert hydra.utils.instantiate(cfg.method).lambda_grid == default_tv_lambda_grid()
    assert hydra.utils.instantiate(cfg.references.tv) is None
    cfg = compose_cfg("train", ["task.variance=2.0", "logger=none"], tmp_path)
    check_tv_weight_task(cfg)
    assert cfg.method.tv_weight == pytest.approx(1e-3) and cfg.tv_weight is None
    # kept: the pair's own settings, another initializer, an explicit weight
    for extra in ([], ["task=inpaint", "task.init=fill"], ["method=pnp_admm", "task=inpaint"]):
        cfg = compose_cfg("train", [*extra, "logger=none"], tmp_path)
        check_tv_weight_task(cfg)
        assert cfg.tv_weight is not None, extra
    cfg = compose_cfg("train", ["method=tv", "task.noise_std=0.05", "method.lam=0.002", "logger=none"], tmp_path)
    check_tv_weight_task(cfg)
    assert float(hydra.utils.instantiate(cfg.method).lam) == pytest.approx(0.002)
    # the ellipse phantoms are not the data the CT weight was chosen on; the anatomy phantoms are
    cfg = compose_cfg("train", ["task=ct", "data.dataset.style=ellipses", "logger=none"], tmp_path)
    with caplog.at_level("WARNING"):
        check_tv_weight_task(cfg)
    assert cfg.tv_weight is None and "data.dataset.style=ellipses (stored for anatomy)" in caplog.text
    cfg = compose_cfg("train", ["task=ct", "logger=none"], tmp_path)
    check_tv_weight_task(cfg)
    assert cfg.tv_weight == stored_tv_weight("ct", "phantoms")
    cfg = compose_cfg("train", ["task=ct", "data.dataset.style=ellipses", "tv_weight=1.33e-3", "logger=none"], tmp_path)
    check_tv_weight_task(cfg)
    assert cfg.tv_weight == pytest.approx(1.33e-3)  # given on the command line: kept
    # evaluate.py without a data group takes the default data's stored weight and its settings
    cfg = compose_cfg("evaluate", ["method=tv", "task=sr4", "task.factor=2"], tmp_path)
    default_data(cfg)
    assert cfg.tv_weight == stored_tv_weight("sr4", "natural")
    check_tv_weight_task(cfg)
    assert cfg.tv_weight is None


def test_without_a_stored_weight_tv_searches_and_the_tv_row_is_absent(tmp_path, image_folder):
    import hydra

    from jfb_ip.lit.callbacks import ReferenceRows
    from jfb_ip.methods import Wiener
    from jfb_ip.methods.tv import default_tv_lambda_grid
    cfg = compose_cfg("train", ["method=tv", "data=folder", f"data.root={image_folder}", "logger=none"], tmp_path)
    assert cfg.tv_weight is None and hydra.utils.instantiate(cfg.references.tv) is None
    tv = hydra.utils.instantiate(cfg.method)
    assert tv.lambda_grid == default_tv_lambda_grid() and len(tv.lambda_grid) == 13
    # with a stored weight, method.lam=null searches again (another data set)
    tv = hydra.utils.instantiate(compose_cfg("train", ["method=tv", "method.lam=null", "logger=none"], tmp_path).method)
    assert tv.lambda_grid == default_tv_lambda_grid()
    assert ReferenceRows({"wiener": Wiener(), "tv": None}).names == ["wiener"]
    # evaluate.py without a data group: train.py's default data, and its stored weight
    from jfb_ip.lit.run import default_data

    cfg = compose_cfg("evaluate", ["method=tv", "task=sr4"], tmp_path)
    assert not cfg.get("data") and cfg.tv_weight is None
    default_data(cfg)
    assert cfg.data.dataset._target_ == "jfb_ip.data.NaturalImages" and cfg.tv_weight == stored_tv_weight("sr4", "natural")
    assert float(hydra.utils.instantiate(cfg.method).lam) == pytest.approx(cfg.tv_weight)


def test_tv_on_a_multitask_batch_equals_per_part_solves():
    task = MultiTask()
    x = torch.rand(5, 3, 24, 24, dtype=torch.float64)
    meas = task.sample(x, seeds=torch.arange(5))
    out, stats = tv_solve(meas, 1e-2, tol=1e-3, max_iter=200)
    for idx, m in meas.parts:
        part, part_stats = tv_solve(m, 1e-2, tol=1e-3, max_iter=200)
        assert torch.allclose(out[idx], part) and torch.equal(stats.iterations[idx], part_stats.iterations)


def test_a_nan_sample_leaves_the_lambda_search_to_the_others():
    """A sample whose score is NaN at every lambda (a NaN image: a diverged batch, another DDP process's) adds
    nothing: the scores equal those of the clean samples alone, scored separately, so the same lambda wins."""
    from jfb_ip.lit.calibration import psnr_score
    from jfb_ip.methods import Wiener

    task = Deblur(kernel_size=5)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    x[2] = float("nan")
    meas = task.sample(x, seeds=torch.arange(3))
    grid = [1e-4, 1e-2, 1.0]
    mixed, clean = Wiener(lambda_grid=grid), Wiener(lambda_grid=grid)
    mixed.calibrate_update(meas, x, psnr_score)
    keep = torch.tensor([True, True, False])
    clean.calibrate_update(meas.subset(keep), x[keep], psnr_score)
    assert torch.isfinite(mixed.scores).all() and mixed.scores.tolist() == pytest.approx(clean.scores.tolist())
    mixed.calibrate_end(), clean.calibrate_end()
    assert mixed.lam.item() == clean.lam.item()


def test_tv_method_tunes_lambda_on_validation_only_and_refuses_options():
    shape = (4, 3, 16, 16)
    task = Deblur(kernel_size=5)
    x = torch.rand(shape)
    meas = task.sample(x, seeds=torch.arange(4))
    method = TV(lambda_grid=[1e-4, 1e-2, 1.0], tol=1e-3)
    from jfb_ip.lit.calibration import psnr_score

    method.calibrate_update(meas, x, psnr_score)
    scores = [psnr_score(tv_solve(meas, lam, tol=1e-3, max_iter=method.max_iter)[0], x).sum().item()
              for lam in method.lambda_grid]
    assert method.scores.tolist() == pytest.approx(scores)
    method.calibrate_end()
    assert method.lam.item() == pytest.approx(method.lambda_grid[max(range(3), key=scores.__getitem__)])
    assert bool(method.tuned)
    rec = method(meas)
    assert rec.stats is not None and rec.x.shape == shape
    with pytest.raises(ValueError, match="solver=broyden cannot apply"):
        TV(solver={"name": "broyden"})
    with pytest.raises(ValueError, match="splitting"):
        TV(splitting="fast")
    with pytest.raises(ValueError, match="lambda_grid value must be > 0"):
        TV(lambda_grid=[0.0])


# ---------------------------------------------------------------- evaluate.py without a checkpoint
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from conftest import ROOT, TINY, compose_cfg, write_images  # noqa: E402
from jfb_ip.lit.errors import ConfigError, main_guard  # noqa: E402
from jfb_ip.lit.run import evaluate, train  # noqa: E402

EVAL_SMALL = ["data.image_size=16", "data.eval_batch_size=4", "data.num_workers=0"]


@pytest.fixture
def png_folder(tmp_path):
    """<root>/{val,test} of small RGB PNGs (no train split: nothing is trained)."""
    root = tmp_path / "pngs"
    write_images(root / "val", 2, (24, 20), seed=1)
    write_images(root / "test", 3, (21, 26), seed=2)
    return root


@pytest.mark.integration
def test_evaluate_tv_without_checkpoint_on_a_folder_cli(png_folder, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "evaluate.py", "method=tv", "task=deblur", "task.kernel_size=5", "data=folder",
                        f"data.root={png_folder}", *EVAL_SMALL, "method.lambda_grid=[1e-3,1e-2]", "method.max_iter=50",
                        f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert metrics["ckpt_path"] is None and metrics["config"]["method"]["_target_"] == "jfb_ip.methods.TV"
    assert test["n_images"] == 3 and test["wiener_lambda_tuned_on_val"] is True and "solver" in test
    assert test["model"]["psnr"] > test["measurement"]["psnr"]
    assert (out / "examples.png").is_file() and "model" in r.stdout


def test_evaluate_pnp_admm_without_checkpoint_on_a_folder(png_folder, tmp_path, denoiser_ckpt):
    cfg = compose_cfg("evaluate", ["method=pnp_admm", "task=inpaint", "data=folder", f"data.root={png_folder}",
                                   *EVAL_SMALL, f"method.denoiser.path={denoiser_ckpt}", "method.n_iter=3",
                                   "method.lambda_grid=[0.1,1.0]"], tmp_path)
    out = evaluate(cfg)
    assert out["test"]["n_images"] == 3 and math.isfinite(out["test"]["model"]["psnr"])
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "examples.png").is_file()


def test_evaluate_wiener_without_checkpoint_equals_train_py(tmp_path):
    """The same seeded val/test measurements as train.py method=wiener (which tunes on val, then tests)."""
    # the task as stored (TINY's 5x5 kernel would drop the stored weight: its settings differ)
    tiny = [o for o in TINY if not o.startswith(("method.", "solver.", "debug", "logger", "task."))]
    (tmp_path / "t").mkdir(), (tmp_path / "e").mkdir()
    trained = train(compose_cfg("train", tiny + ["method=wiener", "logger=none", "trainer=cpu"], tmp_path / "t"))
    data = [o for o in tiny if o.startswith(("data.", "task."))]
    evaluated = evaluate(compose_cfg("evaluate", ["method=wiener", "task=deblur", "data=natural", *data,
                                                  "trainer=cpu"], tmp_path / "e"))
    for row in ("measurement", "wiener", "model"):
        assert evaluated["test"]["per_image"][row]["psnr"] == pytest.approx(trained["test"]["per_image"][row]["psnr"])
    assert evaluated["test"]["wiener_lambda"] == trained["test"]["wiener_lambda"]


def _guarded(cfg):
    with pytest.raises(SystemExit) as e:
        main_guard(evaluate, cfg)
    return str(e.value)


def test_evaluate_without_checkpoint_refuses_what_it_cannot_run(tmp_path, png_folder):
    msg = _guarded(compose_cfg("evaluate", ["method=degrad", "task=deblur"], tmp_path))
    assert "method=degrad is learned: evaluate it from a checkpoint, ckpt_path=" in msg and "\n" not in msg
    assert "needs ckpt_path=" in _guarded(compose_cfg("evaluate", [], tmp_path))
    assert "needs a task: add task=" in _guarded(compose_cfg("evaluate", ["method=tv"], tmp_path))
    assert "brings its own method" in _guarded(compose_cfg("evaluate", ["ckpt_path=x.ckpt", "method=tv"], tmp_path))
    # a folder without val/: the weight is never chosen on test
    no_val = tmp_path / "no_val"
    write_images(no_val / "test", 2, (20, 20))
    folder = ["method=tv", "task=deblur", "task.kernel_size=5", "data=folder", f"data.root={no_val}", *EVAL_SMALL,
              "method.max_iter=20"]
    # a search asked for (the task's stored weight set aside)
    msg = _guarded(compose_cfg("evaluate", folder + ["method.lambda_grid=null"], tmp_path))
    assert "chooses its weight on the validation split, never on test" in msg and "method.lambda_grid=[]" in msg
    out = evaluate(compose_cfg("evaluate", folder + ["method.lambda_grid=[]", "method.lam=0.003"], tmp_path / "nv"))
    assert out["test"]["n_images"] == 2 and out["test"]["wiener_lambda_tuned_on_val"] is False


def test_evaluate_configs_compose_for_every_untrained_method(tmp_path, denoiser_ckpt):
    for method in ("wiener", "tv", "pnp_admm"):
        extra = [f"method.denoiser.path={denoiser_ckpt}"] if method == "pnp_admm" else []
        cfg = compose_cfg("evaluate", [f"method={method}", "task=sr2"] + extra, tmp_path)
        assert cfg.get("solver") is None and cfg.get("backward") is None and cfg.get("data") is None
    with pytest.raises(ConfigError, match="learned"):
        evaluate(compose_cfg("evaluate", ["method=denoiser", "task=denoise"], tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tv_and_pnp_on_cuda_match_cpu():
    from jfb_ip.nets import NoiseConditionedUNet

    x = torch.rand(3, 3, 24, 24)
    for task in (Deblur(kernel_size=5), Inpaint(), SuperResolution(2), MultiTask()):
        cpu = task.sample(x, seeds=torch.arange(3))
        gpu = task.sample(x.cuda(), seeds=torch.arange(3))
        a, _ = tv_solve(cpu, 1e-2, tol=1e-3, max_iter=100)
        b, _ = tv_solve(gpu, 1e-2, tol=1e-3, max_iter=100)
        assert torch.allclose(a, b.cpu(), atol=1e-3)
        net = NoiseConditionedUNet(3, features=[8, 16], blocks=1)
        pnp_cpu = PnPADMM(net, n_iter=3, lambda_grid=[])
        pnp_gpu = PnPADMM(NoiseConditionedUNet(3, features=[8, 16], blocks=1), n_iter=3, lambda_grid=[]).cuda()
        pnp_gpu.load_state_dict(pnp_cpu.state_dict())
        assert torch.allclose(pnp_cpu(cpu).x, pnp_gpu(gpu).x.cpu(), atol=1e-3)


def test_train_py_test_table_has_a_tv_row_at_the_stored_weight(tmp_path):
    """The TV row of train.py's table is TV at the weight stored for deblur on natural photos, solved on the same
    seeded test measurements: an independent tv_solve of those measurements gives the same per-image PSNR."""
    from jfb_ip.bench.common import module_groups, seeded_split_batch
    from jfb_ip.lit.calibration import image_metrics
    from jfb_ip.lit.run import build_module

    # the task as stored (TINY's 5x5 kernel would drop the stored weight: its settings differ)
    tiny = [o for o in TINY if not o.startswith(("method.", "solver.", "debug", "logger", "task."))]
    cfg = compose_cfg("train", tiny + ["method=wiener", "logger=none", "trainer=cpu"], tmp_path)
    out = train(cfg)
    lam = stored_tv_weight("deblur", "natural")
    assert out["test"]["tv_lambda"] == pytest.approx(lam)
    module = build_module(module_groups(cfg))
    x, meas = seeded_split_batch(module_groups(cfg).data, module, "test")
    x_tv, stats = tv_solve(meas, lam)
    assert bool(stats.converged.all())
    psnr, _ = image_metrics(x_tv, x)
    assert out["test"]["per_image"]["tv"]["psnr"] == pytest.approx(psnr.tolist(), abs=1e-3)


def test_the_command_a_stored_tv_weight_names_parses_back_to_its_task_and_overrides(tmp_path, monkeypatch):
    import shlex

    from jfb_ip.bench import tv_weights

    monkeypatch.setattr(tv_weights, "tv_weight_path", lambda task, data: tmp_path / f"{task}_{data}.yaml")
    monkeypatch.setattr(tv_weights, "run_task", lambda task, overrides: {
        "task": task, "data": "celeba", "task_cfg": {"_target_": "jfb_ip.physics.Deblur", "noise_std": 0.02},
        "lam": 5.62e-4, "psnr": 25.98, "ssim": 0.818, "converged": 1.0,
        "iters_mean": 238.0, "iters_max": 373, "seconds_search": 1.0, "seconds_test": 1.0})
    tv_weights.main(["--tasks", "deblur", "--write", "data=celeba", "data.root=/home/me/faces", "data.image_size=64"])
    text = (tmp_path / "deblur_celeba.yaml").read_text()
    command = next(ln[2:] for ln in text.splitlines() if ln.startswith("# python -m"))
    args = tv_weights.parse_args(shlex.split(command)[3:])
    assert args.tasks == ["deblur"] and args.write
    assert args.overrides == ["data=celeba", "data.root=<dir>", "data.image_size=64"]  # the user's path is not kept
    assert "tv_weight: 0.000562" in text
    from omegaconf import OmegaConf

    stored = OmegaConf.load(tmp_path / "deblur_celeba.yaml")
    assert OmegaConf.to_container(stored.tv_weight_task) == {"_target_": "jfb_ip.physics.Deblur", "noise_std": 0.02}
    assert "tv_weight_data" not in stored  # photos: nothing beyond the task
    # generated data: the generator's settings are stored beside the task's
    monkeypatch.setattr(tv_weights, "run_task", lambda task, overrides: {
        "task": task, "data": "phantoms", "task_cfg": {"_target_": "jfb_ip.physics.ParallelBeamCT"},
        "data_cfg": {"style": "ellipses"}, "lam": 1.33e-3, "psnr": 28.0, "ssim": 0.8, "converged": 1.0,
        "iters_mean": 400.0, "iters_max": 900, "seconds_search": 1.0, "seconds_test": 1.0})
    tv_weights.main(["--tasks", "ct", "--write", "data.dataset.style=ellipses"])
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "ct_phantoms.yaml").tv_weight_data) == {"style": "ellipses"}


def test_evaluate_tv_has_no_tv_row_beside_itself_and_wiener_keeps_it(tmp_path):
    """evaluate.py method=tv: the model row is TV at the stored weight, so no tv reference row repeats it; another
    method evaluated at the same settings keeps the row."""
    small = ["task=deblur", "data=natural", "data.image_size=16", "data.dataset.eval_crops=4", "data.eval_batch_size=4",
             "logger=none"]
    tv = evaluate(compose_cfg("evaluate", ["method=tv", *small], tmp_path / "tv"))["test"]
    wiener = evaluate(compose_cfg("evaluate", ["method=wiener", *small], tmp_path / "wiener"))["test"]
    assert "tv" not in tv and "wiener" in tv and "model" in tv
    assert wiener["tv"]["psnr"] == pytest.approx(tv["model"]["psnr"])  # the same solve: the stored weight
