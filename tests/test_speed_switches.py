"""Speed switches on CPU: trainer.precision=bf16-mixed, channels_last and compile give the default's PSNR within a
stated tolerance (each also shown to be active: it changes how the run computes), and the cases they refuse."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_cfg
from jfb_ip.lit.errors import ConfigError
from jfb_ip.lit.run import build_module, evaluate, train
from jfb_ip.lit.speed import apply_speed_switches
from jfb_ip.solvers import equilibrium

# solves that converge (tol 1e-3 within 20 iterations), so a switch cannot hide behind a capped iterate
# MSE and exact training solves, as the tolerances below were measured with: with the default pair's L1 loss and
# solver.train_tol (conf/method_task/degrad_deblur.yaml) the 2-step model's test PSNR came out the same under bf16 to
# 1e-5 dB, so the "autocast did run" check below could not see it
BASE = [o for o in TINY if not o.startswith("solver.max_iter")] + ["solver.max_iter=20",
                                                                   "module.loss._target_=torch.nn.MSELoss",
                                                                   "solver.train_tol=null"]
# bf16 rounds the network's output by ~2^-9 relative. A fixed point met to tol 1e-3 is only pinned down to about
# tol / (1 - Lip T), and this tiny map is weakly contractive, so bf16 moves where the solves stop: measured mean test
# PSNR differences 0.13 dB (evaluate; 0.38 dB on one image) and 0.07 dB (2 training steps + test; docs/operations.md,
# "Speed switches"); at tol 1e-5 the evaluate difference is 0.03 dB. The float32 switches agree to ~1e-5 dB.
BF16_DB, FP32_DB = 0.25, 1e-3


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny DE-GRAD trained 2 steps in float32, its checkpoint and its test table."""
    out = tmp_path_factory.mktemp("speed")
    return out / "checkpoints" / "last.ckpt", train(compose_cfg("train", BASE, out))


def _evaluate(ckpt: Path, tmp_path: Path, *extra: str) -> dict:
    return evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "trainer=cpu", "logger=none", *extra], tmp_path))["test"]


def _diff(a: dict, b: dict) -> tuple[float, float]:
    """(|mean model PSNR difference|, max |per-image difference|) in dB."""
    per = max(abs(x - y) for x, y in zip(a["per_image"]["model"]["psnr"], b["per_image"]["model"]["psnr"]))
    return abs(a["model"]["psnr"] - b["model"]["psnr"]), per


def test_bf16_mixed_evaluate_matches_float32(trained, tmp_path):
    ckpt, _ = trained
    fp32, bf16 = _evaluate(ckpt, tmp_path / "a"), _evaluate(ckpt, tmp_path / "b", "trainer.precision=bf16-mixed")
    mean, per = _diff(fp32, bf16)
    assert 0 < mean < BF16_DB and per < 2 * BF16_DB, (mean, per)  # > 0: autocast did run
    # the solver's own algebra stays float32 under autocast, so the solves still reach tol
    assert bf16["solver"]["converged_fraction"] == fp32["solver"]["converged_fraction"] == 1.0


def test_bf16_mixed_training_matches_float32(trained, tmp_path):
    _, fp32 = trained
    bf16 = train(compose_cfg("train", BASE + ["trainer.precision=bf16-mixed"], tmp_path))
    mean, _ = _diff(fp32["test"], bf16["test"])
    assert 0 < mean < BF16_DB, mean
    assert bf16["test"]["solver"]["converged_fraction"] == 1.0


def test_solver_algebra_stays_float32_under_autocast():
    """Anderson under bf16 autocast converges like in float32: only f would be autocast, and this f has no op
    autocast touches, so both solves are the same computation (without the fix its bmm ran in bfloat16)."""
    g = torch.Generator().manual_seed(0)
    b, z0 = torch.rand(3, 1, 8, 8, generator=g), torch.zeros(3, 1, 8, 8)
    f = lambda z: 0.9 * torch.tanh(z) + b  # noqa: E731  (a contraction)
    ref, ref_stats = equilibrium(f, z0, tol=1e-6, max_iter=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = equilibrium(f, z0, tol=1e-6, max_iter=100)
    assert z.dtype == torch.float32 and bool(stats.converged.all())
    assert torch.equal(stats.iterations, ref_stats.iterations) and torch.allclose(z, ref, atol=1e-6)


def test_channels_last_training_matches(trained, tmp_path):
    _, ref = trained
    out = train(compose_cfg("train", BASE + ["channels_last=true"], tmp_path))
    mean, per = _diff(ref["test"], out["test"])
    assert mean < FP32_DB and per < FP32_DB, (mean, per)


def test_channels_last_converts_weights_and_batches(tmp_path):
    module = build_module(compose_cfg("train", BASE, tmp_path), {})
    apply_speed_switches(module, channels_last=True)
    convs = [m for m in module.method.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    x, _, _ = module.on_after_batch_transfer((torch.rand(2, 3, 16, 16), torch.arange(2)))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_compile_evaluate_matches(trained, tmp_path):
    from torch._dynamo.utils import counters

    ckpt, _ = trained
    before = counters["stats"]["unique_graphs"]
    eager, compiled = _evaluate(ckpt, tmp_path / "a"), _evaluate(ckpt, tmp_path / "b", "compile=true")
    assert counters["stats"]["unique_graphs"] > before  # the network did run compiled
    mean, per = _diff(eager, compiled)
    assert mean < FP32_DB and per < FP32_DB, (mean, per)


@pytest.mark.slow
def test_compile_training_matches(trained, tmp_path):
    """Training through the compiled network (its backward compiled too): about 50 s of compilation on CPU."""
    _, ref = trained
    out = train(compose_cfg("train", BASE + ["compile=true"], tmp_path))
    mean, per = _diff(ref["test"], out["test"])
    assert mean < FP32_DB and per < FP32_DB, (mean, per)


@pytest.mark.parametrize("overrides,message", [
    (["method=wiener"], "has none"),
    (["backward=implicit", "backward.backward_solver=cg"], "differentiates twice"),
])
def test_compile_refuses_what_it_cannot_compile(overrides, message, tmp_path):
    base = [o for o in BASE if not o.startswith(("method.", "solver."))] if "method=wiener" in overrides else BASE
    module = build_module(compose_cfg("train", base + overrides, tmp_path), {})
    with pytest.raises(ConfigError, match=message):
        apply_speed_switches(module, compile=True)


def test_progress_bar_shows_loss_psnr_and_iterations(tmp_path):
    """The progress bar carries the training loss, PSNR and mean solver iterations, and validation PSNR; the CSV
    logger still gets the same keys (prog_bar only adds a copy for the bar)."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from jfb_ip.lit.checks import instantiate_group

    cfg = compose_cfg("train", BASE + ["method.log_lipschitz=false"], tmp_path)
    module, data = build_module(cfg, {}), instantiate_group(cfg, "data")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        log_every_n_steps=1, inference_mode=False)
    trainer.fit(module, datamodule=data)
    bar = trainer.progress_bar_metrics
    assert {"train/loss", "train/psnr", "train/solver/fwd_iters_mean", "val/psnr"} <= set(bar)
    with open(next(tmp_path.glob("lightning_logs/*/metrics.csv"))) as fh:
        columns = set(next(csv.reader(fh)))
    assert {"train/loss", "train/psnr", "train/solver/fwd_iters_mean", "val/psnr"} <= columns
