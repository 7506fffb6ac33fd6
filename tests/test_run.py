"""train.py / evaluate.py end to end: checkpoints, reproducibility, other data, bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.nn.utils.parametrizations import spectral_norm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import ROOT, TINY, compose_cfg
from jfb_ip.data import CelebA, DatasetNotFoundError, ImageFolder
from jfb_ip.checkpoint import CheckpointError
from jfb_ip.lit.checks import check_weight_averaging
from jfb_ip.lit.errors import ConfigError
from jfb_ip.lit.run import evaluate, train
from jfb_ip.nets import DnCNN


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg("train", TINY, out)
    return out, train(cfg)


def test_evaluate_reproduces_the_test_numbers(trained, tmp_path):
    run_dir, payload = trained
    cfg = compose_cfg("evaluate", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "debug=smoke",
                                   "trainer.limit_test_batches=null"], tmp_path)
    out = evaluate(cfg)
    for row in ("measurement", "wiener", "model"):
        assert out["test"][row]["psnr"] == pytest.approx(payload["test"][row]["psnr"], abs=1e-4)
        assert out["test"][row]["ssim"] == pytest.approx(payload["test"][row]["ssim"], abs=1e-5)
    assert (tmp_path / "examples.png").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["test"]) >= {"measurement", "wiener", "model"}


def test_a_checkpoint_holding_the_wiener_row_in_the_module_state_evaluates_the_same(trained, tmp_path):
    """A checkpoint that keeps the Wiener reference row inside the module (state ``wiener.*``, config
    ``module.wiener_prior``, no callback state) tests as the same run does: the row keeps the weight tuned in
    training, and every row's numbers are the run's own."""
    run_dir, payload = trained
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    row = ckpt.pop("callbacks")["ReferenceRows"]["wiener"]
    ckpt["state_dict"].update({f"wiener.{k}": v for k, v in row.items()})
    run_config = ckpt["hyper_parameters"]["run_config"]
    run_config["module"]["wiener_prior"] = run_config.pop("references")["wiener"]["prior"]
    torch.save(ckpt, tmp_path / "inside.ckpt")
    out = evaluate(compose_cfg("evaluate", [f"ckpt_path={tmp_path / 'inside.ckpt'}", "debug=smoke",
                                            "trainer.limit_test_batches=null"], tmp_path))
    assert out["test"]["wiener_lambda"] == payload["test"]["wiener_lambda"] and out["test"]["wiener_lambda_tuned_on_val"]
    for name in ("measurement", "wiener", "model"):
        assert out["test"][name]["psnr"] == pytest.approx(payload["test"][name]["psnr"], abs=1e-4)


def test_evaluate_on_an_image_folder(trained, tmp_path, image_folder):
    run_dir, _ = trained
    (image_folder / "train").rename(image_folder / "unused")  # evaluate needs only <dir>/test
    cfg = compose_cfg("evaluate", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "debug=smoke",
                                   "data=folder", f"data.root={image_folder}", "data.image_size=16",
                                   "data.num_workers=0"], tmp_path)
    out = evaluate(cfg)
    assert out["test"]["n_images"] == 3


def test_evaluate_of_a_checkpoint_takes_tv_weight_for_its_tv_row(trained, tmp_path):
    """``evaluate.py ckpt_path=... tv_weight=<w>`` (TV tuned for other images than the run's): the TV row is an
    independent tv_solve of the same seeded test measurements at <w>, not at the checkpoint run's weight."""
    from jfb_ip.bench.common import module_groups, seeded_split_batch
    from jfb_ip.lit.calibration import image_metrics
    from jfb_ip.lit.run import build_module
    from jfb_ip.methods import tv_solve

    run_dir, _ = trained
    lam = 3e-3
    out = evaluate(compose_cfg("evaluate", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "debug=smoke",
                                            "trainer.limit_test_batches=null", f"tv_weight={lam}"], tmp_path))
    assert out["test"]["tv_lambda"] == pytest.approx(lam)
    cfg = module_groups(compose_cfg("train", TINY, tmp_path / "cfg"))
    x, meas = seeded_split_batch(cfg.data, build_module(cfg), "test")
    psnr, _ = image_metrics(tv_solve(meas, lam)[0], x)
    assert out["test"]["per_image"]["tv"]["psnr"] == pytest.approx(psnr.tolist(), abs=1e-3)


def test_resume_from_checkpoint(trained, tmp_path):
    run_dir, _ = trained
    cfg = compose_cfg("train", TINY + [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                                       "trainer.max_steps=3", "test=false"], tmp_path)
    out = train(cfg)
    assert out["train"]["steps"] == 3  # continued from step 2


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = compose_cfg("evaluate", [f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(cfg)


class Payload:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("code ran",))


def _bad_checkpoints(good: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    import torch

    out = {}
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    out["truncated"] = (tmp_path / "truncated.ckpt", "not a readable jfb-ip checkpoint")
    (tmp_path / "text.ckpt").write_text("hello")
    out["text"] = (tmp_path / "text.ckpt", "not a readable jfb-ip checkpoint")
    torch.save({"state_dict": {}, "evil": Payload()}, tmp_path / "code.ckpt")
    out["code"] = (tmp_path / "code.ckpt", "not a readable jfb-ip checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.ckpt")
    out["foreign"] = (tmp_path / "foreign.ckpt", "holds no model state_dict")
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"]["run_config"]["method"]["net"]["depth"] = 4  # another architecture
    torch.save(ckpt, tmp_path / "other.ckpt")
    out["other"] = (tmp_path / "other.ckpt", "does not match the method")
    return out


@pytest.mark.parametrize("kind", ["truncated", "text", "code", "foreign", "other"])
def test_unusable_checkpoints_give_one_clear_error(trained, tmp_path, kind, capsys):
    run_dir, _ = trained
    path, message = _bad_checkpoints(run_dir / "checkpoints" / "last.ckpt", tmp_path)[kind]
    cfg = compose_cfg("evaluate", [f"ckpt_path={path}", "debug=smoke"], tmp_path)
    with pytest.raises(CheckpointError, match=message):
        evaluate(cfg)
    assert "code ran" not in capsys.readouterr().out


def test_image_folder_loading(image_folder):
    train_ds = ImageFolder("train", 16, root=image_folder)
    assert len(train_ds) == 5
    for ds in (train_ds, ImageFolder("test", 24, root=image_folder)):
        x, i = ds[0]
        assert x.shape == (3, ds.image_size, ds.image_size) and 0 <= x.min() and x.max() <= 1
    gray = ImageFolder("val", 16, root=image_folder, channels=1)
    assert gray[0][0].shape == (1, 16, 16)


def test_fake_celeba_uses_the_official_split(fake_celeba):
    sizes = {s: len(CelebA(s, 32, root=fake_celeba)) for s in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 1, "test": 2}
    x, _ = CelebA("test", 32, root=fake_celeba)[0]
    assert x.shape == (3, 32, 32)


def test_missing_paths_say_where_files_must_be(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"img_align_celeba.*list_eval_partition"):
        CelebA("train", 32, root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"<root>/train"):
        ImageFolder("train", 32, root=tmp_path)
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolder("test", 32, root=tmp_path)


@pytest.mark.integration
def test_cli_reports_missing_dataset_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "data=folder", f"data.root={tmp_path}/none", "logger=none",
                        f"hydra.run.dir={tmp_path}/out"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "error: image folder split 'train' not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_wiener_baseline_is_tuned_on_validation_even_without_validation_epochs(tmp_path):
    cfg = compose_cfg("train", TINY + ["trainer.check_val_every_n_epoch=1000"], tmp_path)
    out = train(cfg)
    assert out["test"]["wiener_lambda_tuned_on_val"] is True


def test_evaluate_replaces_the_forward_solver(trained, tmp_path):
    """``solver=`` re-tests a checkpoint with another forward solver (the weights do not depend on it): one
    plain iteration caps every solve at 1, where no solve meets a 1e-12 tolerance; Anderson with room to run
    goes further and ends at a smaller residual. The choice is written to metrics.json."""
    run_dir, _ = trained
    base = [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "debug=smoke", "trainer.limit_test_batches=null"]
    capped = evaluate(compose_cfg("evaluate", base + ["solver=fixed_point", "solver.max_iter=1", "solver.tol=1e-12"],
                                  tmp_path / "capped"))["test"]["solver"]
    assert capped["fwd_iters_max"] == 1 and capped["converged_fraction"] == 0
    longer = evaluate(compose_cfg("evaluate", base + ["solver=anderson", "solver.max_iter=40", "solver.tol=1e-5"],
                                  tmp_path / "longer"))["test"]["solver"]
    assert longer["fwd_iters_max"] > 1 and longer["fwd_residual_max"] < capped["fwd_residual_max"]
    saved = json.loads((tmp_path / "longer" / "metrics.json").read_text())
    assert (saved["solver"]["name"], saved["solver"]["max_iter"]) == ("anderson", 40)


def test_evaluate_refuses_a_solver_for_a_method_without_one(tmp_path):
    out = tmp_path / "lu"
    train(compose_cfg("train", [o for o in TINY if not o.startswith(("method.", "solver."))]
                      + ["method=lu_dncnn", "method.net.depth=3", "method.net.width=8", "method.stages=2",
                         "test=false"], out))
    cfg = compose_cfg("evaluate", [f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "solver=anderson"], tmp_path)
    with pytest.raises(Exception, match="without a forward solve.*drop solver="):
        evaluate(cfg)


def _spectral_linear_ema(use_buffers: bool):
    """A spectrally normalised linear map whose top singular vectors turn by 22.5 degrees at every training step
    (R diag(1.5, 0.5, 0.2, 0.2) R^T, R a rotation of the first two axes), averaged by torch's AveragedModel (what
    Lightning's weight averaging wraps) with an EMA, and returned as validation evaluates it: eval mode, the stored
    power-iteration vectors, no new iteration."""
    torch.manual_seed(0)
    lin = spectral_norm(torch.nn.Linear(4, 4, bias=False), n_power_iterations=10)  # converged at every step
    avg = AveragedModel(lin, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    for k in range(40):
        c, s = math.cos(k * math.pi / 8), math.sin(k * math.pi / 8)
        rot = torch.eye(4)
        rot[:2, :2] = torch.tensor([[c, -s], [s, c]])
        with torch.no_grad():
            lin.parametrizations.weight.original.copy_(rot @ torch.diag(torch.tensor([1.5, 0.5, 0.2, 0.2])) @ rot.T)
        lin.train()
        lin.weight  # one training forward: power iteration on the new weights
        avg.update_parameters(lin)
    avg.eval()
    return avg.module.weight.detach()


def test_averaging_spectral_norm_buffers_inflates_the_normalised_weights():
    """Why check_weight_averaging exists: normalisation makes the weight's spectral norm (by SVD here) 1. With the
    power-iteration vectors averaged as well, their average is short and the weight comes out far above 1 (15 here);
    with the live vectors (use_buffers=False keeps them in sync) it stays within a few percent of 1 (the vectors
    belong to the last weights, not exactly to their average: 1.03 here)."""
    inflated = float(torch.linalg.matrix_norm(_spectral_linear_ema(use_buffers=True), ord=2))
    kept = float(torch.linalg.matrix_norm(_spectral_linear_ema(use_buffers=False), ord=2))
    assert inflated > 1.5, inflated
    assert 1.0 - 1e-4 < kept < 1.1, kept


def test_weight_averaging_over_normalised_convs_needs_use_buffers_false(tmp_path):
    net = DnCNN(3, depth=3, width=4, spectral_norm=True)
    with pytest.raises(ConfigError, match=r"EMAWeightAveraging with use_buffers=true.*use_buffers=false"):
        check_weight_averaging([EMAWeightAveraging()], net)
    check_weight_averaging([EMAWeightAveraging(use_buffers=False)], net)
    check_weight_averaging([EMAWeightAveraging()], DnCNN(3, depth=3, width=4))  # no normalisation, no vectors
    check_weight_averaging([EMAWeightAveraging()], torch.nn.BatchNorm2d(3))  # running stats are meant to average
    # the whole command: refused before training starts, nothing written but Hydra's record
    cfg = compose_cfg("train", TINY + ["+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging"],
                      tmp_path)
    with pytest.raises(ConfigError, match="use_buffers=false"):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))
