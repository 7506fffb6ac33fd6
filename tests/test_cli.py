"""The command line as a new user meets it: methods with nothing to train, the overfit check,
and bad input that must end in one line naming its cause."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, compose_cfg
from jfb_ip.lit.run import train


def test_wiener_method_trains_nothing_and_matches_the_wiener_row(tmp_path):
    overrides = [o for o in TINY if not o.startswith(("method.", "solver."))] + ["method=wiener"]
    out = train(compose_cfg("train", overrides, tmp_path))
    assert out["train"]["steps"] == 0
    # the same tuned inverse, evaluated by the method path and by the reference row
    assert out["test"]["model"]["psnr"] == pytest.approx(out["test"]["wiener"]["psnr"], abs=1e-6)
    assert out["test"]["wiener_lambda_tuned_on_val"] is True
    assert "solver" not in out["test"]  # no fixed point, no solver block


@pytest.mark.slow
def test_overfit_one_batch_drives_the_loss_down(tmp_path):
    """debug=overfit: on one repeated batch with fixed noise the training loss must fall well below
    its start (measured: 0.0051 -> 0.0015 in 150 steps of the tiny DE-GRAD; a wrong gradient stalls it)."""
    overrides = [o for o in TINY if not o.startswith("debug=")] + ["debug=[smoke,overfit]", "logger=csv", "test=false"]
    train(compose_cfg("train", overrides, tmp_path))
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/**/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < 0.4 * losses[0], (losses[0], losses[-1])


def _cli(args, tmp_path, script="train.py"):
    return subprocess.run([sys.executable, script, *args, "logger=none", f"hydra.run.dir={tmp_path}/out"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["trainer.max_steps=abc"], "max_steps"),
    (["solver.max_iter=0"], "max_iter must be an integer >= 1"),
    (["backward=neumann", "backward.neumann_k=-1"], "neumann_k must be an integer >= 0"),
    (["method=lu_dncnn", "backward.unroll_steps=3"], "takes no backward options"),
])
@pytest.mark.integration
def test_bad_command_lines_end_in_one_line(args, message, tmp_path):
    r = _cli(args, tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and message in r.stderr, r.stderr[-1500:]


@pytest.mark.integration
def test_evaluate_refuses_a_corrupt_checkpoint_in_one_line(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    r = subprocess.run([sys.executable, "evaluate.py", f"ckpt_path={tmp_path / 'bad.ckpt'}",
                        f"hydra.run.dir={tmp_path}/out"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "is not a readable jfb-ip checkpoint" in r.stderr


def test_metrics_json_stays_valid_with_non_finite_numbers(tmp_path):
    from jfb_ip.lit.outputs import write_metrics

    path = write_metrics(tmp_path, {"test": {"model": {"psnr": float("nan"), "ssim": float("inf")}, "n": 3}})
    data = json.loads(path.read_text())  # strict JSON: NaN would not parse in other tools
    assert data == {"test": {"model": {"psnr": None, "ssim": None}, "n": 3}, "non_finite": True}
    assert "NaN" not in path.read_text()


@pytest.mark.integration
def test_a_missing_test_split_fails_before_training(tmp_path, image_folder):
    import shutil

    shutil.rmtree(image_folder / "test")
    r = _cli(["data=folder", f"data.root={image_folder}", "data.image_size=16", "data.num_workers=0"], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "test" in r.stderr.splitlines()[-1] and "not found" in r.stderr.splitlines()[-1]
    assert not list((tmp_path / "out").glob("checkpoints/*.ckpt"))  # nothing trained
