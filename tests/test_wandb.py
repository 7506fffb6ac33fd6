"""A real offline multirun logged to wandb: what each job's run holds, read back from the files wandb wrote."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from jfb_ip.sync import main as sync_main
from jfb_ip.sync import offline_runs, read_run

pytest.importorskip("wandb")


def _job_runs(sweep) -> list[tuple[dict, dict, dict]]:
    """(wandb run read from its .wandb log, the job's Hydra overrides as a dict, its metrics.json) per job."""
    out = []
    for job in sorted(d for d in sweep.iterdir() if (d / ".hydra").is_dir()):
        runs = offline_runs([job])
        assert len(runs) == 1, f"{job.name}: {len(runs)} wandb runs"
        assert (job / "checkpoints" / "last.ckpt").is_file()  # and its own checkpoint
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        out.append((read_run(runs[0]), {**overrides, "num": job.name.split("_")[0]},
                    json.loads((job / "metrics.json").read_text())))
    return out


@pytest.mark.integration
def test_each_job_of_a_multirun_is_its_own_named_grouped_finished_run(tiny_sweep):
    jobs = _job_runs(tiny_sweep)
    assert len(jobs) == 4
    names = [run["name"] for run, _, _ in jobs]
    assert len(set(names)) == 4
    for run, ov, _ in jobs:
        # group and name from method, task and backward (what Hydra recorded for the job), the seed and job number
        assert run["group"] == f"degrad-deblur-{ov['backward']}"
        assert run["name"] == f"degrad-deblur-{ov['backward']}-s{ov['seed']}-j{ov['num']}"
        assert run["tags"] == ["sweep_test"] and run["job_type"] == "train"
        assert run["exit_code"] == 0  # finished by its own job, not left open for the next one


@pytest.mark.integration
def test_each_run_logs_its_full_config_and_the_expected_keys(tiny_sweep):
    for run, ov, metrics in _job_runs(tiny_sweep):
        cfg = run["config"]
        assert cfg["backward"]["mode"] == ov["backward"] and cfg["seed"] == int(ov["seed"])
        assert cfg["choices"]["method"] == "degrad" and cfg["choices"]["backward"] == ov["backward"]
        assert cfg["method"] == metrics["config"]["method"] and cfg["task"] == metrics["config"]["task"]
        assert cfg["data"]["image_size"] == 16 and cfg["trainer"]["max_steps"] == 2
        assert cfg["module"]["optimizer"]["lr"] == pytest.approx(1e-3)
        logged = run["history_keys"]
        expected = {"train/loss", "val/loss", "val/psnr", "val/ssim", "time/step_s", "memory/rss_bytes",
                    "train/solver/fwd_iters_mean", "train/solver/fwd_residual_max", "val/solver/fwd_iters_mean",
                    "val/examples/_type", "test/examples/_type", "test/table/_type", "test/model_psnr"}
        if ov["backward"] == "implicit":
            expected |= {"train/solver/bwd_iters_mean", "train/solver/bwd_residual_max"}
        assert expected <= logged, expected - logged
        summary = run["summary"]
        # measurement, wiener, model (debug=smoke has no TV row)
        assert summary["test/table/_type"] == "table-file" and summary["test/table/nrows"] == 3
        for row in ("measurement", "wiener", "model"):
            for k in ("psnr", "ssim"):
                assert summary[f"test/{row}_{k}"] == pytest.approx(metrics["test"][row][k], rel=1e-6)


@pytest.mark.integration
def test_sync_lists_the_offline_runs_and_reads_a_torn_log(tiny_sweep, tmp_path, capsys):
    assert sync_main([str(tiny_sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 offline run(s)" in out
    assert all(f"degrad-deblur-{b}-s{s}-j" in out for b in ("jfb", "implicit") for s in (0, 1))
    # a run killed while writing: the log ends mid-record; what was written before still reads
    src = offline_runs([tiny_sweep])[0]
    torn = tmp_path / src.name
    shutil.copytree(src, torn)
    log = next(torn.glob("run-*.wandb"))
    data = log.read_bytes()
    log.write_bytes(data[:len(data) // 2])
    run = read_run(torn)
    assert run["name"] == read_run(src)["name"] and run["exit_code"] is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sync_main([str(empty)]) == 0 and "no offline wandb runs" in capsys.readouterr().out
