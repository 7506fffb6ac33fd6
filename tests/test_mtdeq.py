"""method=mtdeq (Willingham et al. [4] Alg. 1, eq. (3)): the fixed point against a dense solve, the prior's noise
level, the implicit gradient against finite differences, every backward mode, the divergence guard, train.py runs."""
from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import open_dict
from torch import nn

from conftest import CONF, TINY, compose_cfg
from jfb_ip.lit.run import train
from jfb_ip.methods import MTDEQ
from jfb_ip.nets import NoiseConditionedUNet
from jfb_ip.physics import MultiTask

BACKWARDS = sorted(p.stem for p in (Path(CONF) / "backward").glob("*.yaml") if p.stem != "none")
# tiny settings for train.py runs (the UNet's own keys: jfb_ip.nets.NoiseConditionedUNet)
SMALL_NET = ["method.net.features=[8,16]", "method.net.blocks=1"]
MULTITASK = ["task=multitask", "data.image_size=24", "task.blur.kernel_size=5", "task.problems_per_image=2",
             "data.batch_size=2", "data.eval_batch_size=4"]


class ScaledIdentity(nn.Module):
    """Q(x, s) = c / (1 + s) x: a linear, noise-conditioned 'denoiser' whose fixed points have a closed form;
    it records the noise levels it is given."""

    def __init__(self, c: float = 0.9):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, sigma):
        self.seen.append(sigma.detach().clone())
        return self.c.to(x.dtype) / (1 + sigma.to(x.dtype)).reshape(-1, 1, 1, 1) * x


def mixed_batch(n: int = 8, size: int = 12, seed: int = 0, dtype=torch.float64):
    """A gray multitask batch (kernel 5 so 12 px hold it; SR factors 1..4 divide 12), in float64 by default."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 1, size // 3, size // 3, generator=g, dtype=dtype),
                                        size=(size, size), mode="bilinear", align_corners=False)
    task = MultiTask(blur=dict(kernel_size=5), channels=1)
    return x, task.sample(x, seeds=torch.arange(n) + 11)


def dense_fixed_point(meas, c: float, eta: float) -> torch.Tensor:
    """z = k (z - eta (M z - b)), k = c / (1 + eta sigma): (I - k (I - eta M)) z = k eta b per sample, with
    M = A^T A and b = A^T y read off the affine map grad(z) = M z - b on the basis vectors, solved densely."""
    B, shape = meas.batch_size, meas.x_shape[1:]
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    g0 = meas.grad(torch.zeros(B, *shape, dtype=torch.float64)).reshape(B, d)
    cols = torch.stack([meas.grad(basis[j].expand(B, *shape)).reshape(B, d) - g0 for j in range(d)], -1)  # (B, d, d)
    k = (c / (1 + eta * meas.sigma)).reshape(B, 1, 1)
    eye = torch.eye(d, dtype=torch.float64)
    z = torch.linalg.solve(eye - k * (eye - eta * cols), (k[..., 0] * eta * -g0)[..., None])
    return z.reshape(B, *shape)


def method(net, solver="fixed_point", mode="jfb", tol=1e-9, max_iter=600, **backward):
    return MTDEQ(net, {"name": solver, "tol": tol, "max_iter": max_iter}, {"mode": mode, **backward})


def test_fixed_point_is_eq_3_of_willingham_solved_densely():
    x, meas = mixed_batch()
    assert len(meas.parts) >= 3  # several degradations in the batch
    net = ScaledIdentity()
    rec = method(net)(meas)
    assert bool(rec.stats.converged.all())
    assert torch.allclose(rec.x, dense_fixed_point(meas, 0.9, 0.49), atol=1e-7)
    # the prior gets sigma_denoise = eta * sigma_noise of its own sample (§III-B of Willingham et al. [4])
    assert torch.allclose(net.seen[0], 0.49 * meas.sigma)


def test_implicit_gradient_matches_finite_differences_of_the_dense_solution():
    x, meas = mixed_batch(n=6, seed=1)
    net = ScaledIdentity(0.8)
    m = method(net, solver="anderson", mode="implicit", tol=1e-10, max_iter=300, backward_solver="anderson",
               backward_tol=1e-10, backward_max_iter=300)
    loss = ((m(meas).x - x) ** 2).sum()
    loss.backward()
    h = 1e-5
    fd = (((dense_fixed_point(meas, 0.8 + h, 0.49) - x) ** 2).sum()
          - ((dense_fixed_point(meas, 0.8 - h, 0.49) - x) ** 2).sum()) / (2 * h)
    assert net.c.grad.item() == pytest.approx(fd.item(), rel=1e-4)


def test_a_capped_solve_is_not_converged():
    _, meas = mixed_batch(n=4)
    rec = method(ScaledIdentity(0.99), tol=1e-12, max_iter=3)(meas)
    assert not bool(rec.stats.converged.any()) and rec.stats.iterations.tolist() == [3] * 4


@pytest.mark.parametrize("backward", BACKWARDS)
def test_every_backward_mode_composes(backward, tmp_path):
    cfg = compose_cfg("train", ["method=mtdeq", f"backward={backward}"], tmp_path)
    m = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert m.solve.mode == backward and m.solve.forward == "fixed_point"
    # the paper's stopping rule as the solvers' tolerance (jfb_ip.methods.MTDEQ), the cap and the guard
    assert (m.solve.tol, m.solve.max_iter, m.solve.solver_options["bound"]) == (6e-4, 350, 1e10)


def save_checkpoint(path: Path, net: nn.Module, net_cfg: dict) -> None:
    """A train.py-shaped checkpoint: the net under method.net.* and its config in the run config."""
    torch.save({"state_dict": {f"method.net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"run_config": {"method": {"_target_": "jfb_ip.methods.Denoiser",
                                                               "net": net_cfg}}}}, path)


def test_denoiser_weights_initialise_the_prior(tmp_path):
    """init_from copies a checkpoint's method.net weights in at the first forward, and never over loaded ones."""
    cfg = {"channels": 1, "features": [4, 8], "blocks": 1}
    src, path = NoiseConditionedUNet(**cfg), tmp_path / "denoiser.ckpt"
    save_checkpoint(path, src, {"_target_": "jfb_ip.nets.NoiseConditionedUNet", **cfg})
    _, meas = mixed_batch(n=2, dtype=torch.float32)
    opts = ({"name": "fixed_point", "tol": 1e-3, "max_iter": 2}, {"mode": "jfb"})
    m = MTDEQ(NoiseConditionedUNet(**cfg), *opts, init_from=str(path))
    assert not torch.equal(m.net.head.weight, src.head.weight)  # construction loads nothing
    m(meas)
    assert bool(m.initialised) and all(torch.equal(a, b) for a, b in zip(m.net.state_dict().values(),
                                                                         src.state_dict().values()))
    # a trained checkpoint (initialised=True in its state) is never overwritten by init_from, even when it is gone
    trained = MTDEQ(NoiseConditionedUNet(**cfg), *opts, init_from=str(tmp_path / "gone.ckpt"))
    trained.load_state_dict(MTDEQ(NoiseConditionedUNet(**cfg), *opts).state_dict())
    trained(meas)
    with pytest.raises(ValueError, match="method.init_from=.*does not exist"):
        MTDEQ(NoiseConditionedUNet(**cfg), *opts, init_from=str(tmp_path / "gone.ckpt"))(meas)
    with pytest.raises(ValueError, match="differs from method.net"):
        MTDEQ(NoiseConditionedUNet(1, [4, 8, 16], 1), *opts, init_from=str(path))(meas)


class ExplodingNet(nn.Module):
    """A trainable conv whose map blows up (x 10 per iteration) for samples with noise level above ``above``:
    their solves must be flagged diverged and skipped while the others train."""

    def __init__(self, channels: int = 3, above: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.above = above

    def forward(self, x, sigma):
        gain = torch.where(sigma > self.above, 10.0, 0.5).to(x.dtype).reshape(-1, 1, 1, 1)
        return gain * (x + 0.1 * self.conv(x))


def test_divergence_guard_skips_exploding_samples_and_training_goes_on(tmp_path):
    cfg = compose_cfg("train", [o for o in TINY if not o.startswith(("method.", "solver.", "task."))]
                      + ["method=mtdeq", *MULTITASK, "trainer.max_steps=3", "trainer.limit_train_batches=3",
                         "test=false", "solver.max_iter=40"], tmp_path)
    with open_dict(cfg):
        # eta * sigma_noise > 0.05 <=> sigma_noise > 0.102: 29 of the 50 noise levels blow up
        cfg.method.net = {"_target_": "test_mtdeq.ExplodingNet", "channels": 3, "above": 0.05}
    out = train(cfg)
    assert out["train"]["steps"] == 3  # every step took an optimizer step
    assert out["train"]["skipped_samples"] > 0
    assert 0 < out["train"]["skipped_samples"] < 3 * 2 * 2  # 3 steps x 2 images x 2 problems


@pytest.mark.parametrize("backward", ["jfb", "implicit"])
def test_mtdeq_fast_dev_run_on_multitask(backward, tmp_path):
    cfg = compose_cfg("train", [o for o in TINY if not o.startswith(("method.", "solver.", "task."))]
                      + ["method=mtdeq", *MULTITASK, *SMALL_NET, "solver.max_iter=5", f"backward={backward}",
                         "+trainer.fast_dev_run=true"], tmp_path)
    out = train(cfg)
    test = out["test"]
    assert test["n_images"] == 4 and all(math.isfinite(v) for v in test["per_image"]["model"]["psnr"])
    assert test["solver"]["n_samples"] == 4


def test_bench_multitask_end_to_end(tmp_path, monkeypatch):
    """python -m jfb_ip.bench.multitask on a tiny budget and two tasks: every row, the JSON, the PNG, and the two
    priors under identical PnP hyper-parameters (the schedule and lam chosen for the Gaussian prior)."""
    import json

    from jfb_ip.bench import multitask as bench

    tiny = {**bench.QUICK, "denoiser_steps": 3, "mtdeq_steps": 2, "train_size": 24, "test_size": 24, "batch": 2,
            "mtdeq_batch": 1, "problems": 2, "eval_crops": 2, "fb_rows": True, "fb_max_iter": 5, "lam_search": True,
            "net": ["method.net.features=[8,16]", "method.net.blocks=1"], "pnp_schedules": [(2, None), (3, 0.03)]}
    monkeypatch.setattr(bench, "QUICK", tiny)
    monkeypatch.setattr(bench, "TASKS", {k: bench.TASKS[k] for k in ("comp80", "sr3_n.01")})
    out = bench.main(["--quick", "--mtdeq-steps", "3", "--mtdeq-lr", "3e-5", "--out", str(tmp_path),
                      "data.dataset.train_samples=4"])
    run_dir = Path(out["run_dir"])
    assert run_dir.parent == tmp_path / "runs"  # a new directory per bench run
    rows = json.loads((run_dir / "multitask.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(out["rows"]))
    assert (run_dir / "multitask.png").is_file()
    assert out["budget"]["mtdeq_steps"] == 3 and out["mtdeq_train"]["steps"] == 3  # --mtdeq-steps, not the budget's 2
    from jfb_ip.checkpoint import load_checkpoint

    mtdeq_run = load_checkpoint(run_dir / "mtdeq" / "checkpoints" / "last.ckpt")["hyper_parameters"]["run_config"]
    assert out["budget"]["mtdeq_lr"] == mtdeq_run["module"]["optimizer"]["lr"] == 3e-5  # --mtdeq-lr, not 1e-5
    for task in ("comp80", "sr3_n.01"):
        got = {r["method"]: r for r in rows if r["task"] == task}
        assert {"measurement", "tv", "pnp_gauss", "pnp_mtdeq", "fb_gauss", "fb_mtdeq", "mtdeq_minus_gauss"} <= set(got)
        assert all(math.isfinite(r["psnr"]) for r in got.values())
        gauss, mt = got["pnp_gauss"], got["pnp_mtdeq"]
        assert gauss["schedule"] == mt["schedule"] and gauss["lambda"] == mt["lambda"]
        assert got["mtdeq_minus_gauss"]["psnr"] == pytest.approx(mt["psnr"] - gauss["psnr"])


@pytest.mark.parametrize("tune_each_prior", [False, True])
def test_bench_multitask_prior_hyper_parameters(tune_each_prior, tmp_path, monkeypatch):
    """Which PnP hyper-parameters each prior gets: by default the Gaussian prior's schedule and its searched lam for
    both ([4] §III-C); with --tune-each-prior each prior's own schedule (searched with its own checkpoint) and its
    own lam search on the validation crops."""
    from jfb_ip.bench import multitask as bench

    calls = []

    def fake_schedule(b, task_ov, ckpt, extra):
        return [f"method.n_iter={len(ckpt)}"], {ckpt: 0.0}

    def fake_run(overrides, run_dir):
        calls.append((run_dir.name, overrides))
        metrics = {"psnr": 20.0, "ssim": 0.5}
        return {"test": {"model": metrics, "measurement": metrics, "method_lambda": 0.1 * len(calls)}}

    monkeypatch.setattr(bench, "pnp_schedule", fake_schedule)
    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "TASKS", {"comp80": bench.TASKS["comp80"]})
    ckpts = {"denoiser_ckpt": "gauss.ckpt", "mtdeq_ckpt": "mtdeq-prior.ckpt"}
    bench.evaluate_rows({**bench.QUICK}, tmp_path, [], ckpts, degrad=False, tune_each_prior=tune_each_prior)
    ov = dict(calls)
    assert "method.denoiser.path=gauss.ckpt" in ov["pnp_gauss"]
    assert "method.denoiser.path=mtdeq-prior.ckpt" in ov["pnp_mtdeq"]
    assert "method.n_iter=10" in ov["pnp_gauss"]  # len("gauss.ckpt"): the Gaussian prior's schedule
    if tune_each_prior:
        assert "method.n_iter=16" in ov["pnp_mtdeq"]  # len("mtdeq-prior.ckpt"): its own
        assert not any(o.startswith(("method.lam=", "method.lambda_grid")) for o in ov["pnp_mtdeq"] + ov["pnp_gauss"])
    else:
        assert "method.n_iter=10" in ov["pnp_mtdeq"] and "method.lambda_grid=[]" in ov["pnp_mtdeq"]
        gauss_lam = 0.1 * ([name for name, _ in calls].index("pnp_gauss") + 1)
        assert f"method.lam={gauss_lam}" in ov["pnp_mtdeq"]
