"""python -m jfb_ip.report on the run directories of a real multirun (tests/conftest.py `tiny_sweep`)."""
from __future__ import annotations

import json
import shutil
import statistics

import pytest
import yaml
from PIL import Image

from jfb_ip.report import main, report


def _metrics_by_backward(sweep) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for job in sweep.iterdir():
        if (job / ".hydra").is_dir():
            ov = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
            out.setdefault(ov["backward"], []).append(json.loads((job / "metrics.json").read_text()))
    return out


@pytest.mark.integration
def test_report_rows_average_the_seeds_of_each_backward_mode(tiny_sweep, tmp_path):
    res = report([tiny_sweep], tmp_path / "rep")
    by_mode = _metrics_by_backward(tiny_sweep)
    assert sorted(r["backward"] for r in res["rows"]) == ["implicit", "jfb"] and not res["failed"]
    for row in res["rows"]:
        runs = by_mode[row["backward"]]
        assert (row["method"], row["task"], row["setting"]) == ("degrad", "deblur", "")
        assert row["seeds"] == [0, 1] and len(row["runs"]) == 2
        psnr = [m["test"]["model"]["psnr"] for m in runs]
        assert row["psnr"] == pytest.approx(statistics.fmean(psnr)) and row["psnr_std"] == pytest.approx(
            statistics.stdev(psnr))
        assert row["step_time_s"] == pytest.approx(statistics.fmean(m["train"]["step_time_s_median"] for m in runs))
        assert row["peak_memory_bytes"] > 0 and row["memory_measure"] == "peak RSS (CPU)"
        assert row["fwd_iters"] == pytest.approx(statistics.fmean(m["train"]["fwd_iters_mean"] for m in runs))
        assert row["steps"] == 2 and row["wall_time_s"] > 0
        assert row["measurement_psnr"] == pytest.approx(statistics.fmean(m["test"]["measurement"]["psnr"]
                                                                         for m in runs))
        assert row["tv_psnr"] is None  # debug=smoke has no TV row
        assert row["lipschitz_T"] == pytest.approx(statistics.fmean(m["val"]["val/solver/lipschitz_T_mean"]
                                                                    for m in runs))
        assert row["converged_fraction"] == pytest.approx(statistics.fmean(m["test"]["solver"]["converged_fraction"]
                                                                           for m in runs))
        # only the implicit mode runs a backward solve
        assert (row["bwd_iters"] is not None) == (row["backward"] == "implicit")
    lines = res["markdown"].splitlines()
    assert lines[0].startswith("| method | task | backward |") and "| step time [s] |" in lines[0]
    assert "| Lip(T) |" in lines[0] and "| converged |" in lines[0] and "| TV PSNR |" not in lines[0]
    body = [ln for ln in lines[2:] if ln.startswith("| degrad |")]
    assert len(body) == 2 and all("| 0,1 |" in ln for ln in body)
    for name in ("psnr_by_method.png", "cost_vs_accuracy.png"):
        with Image.open(tmp_path / "rep" / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert (tmp_path / "rep" / "report.md").read_text().startswith("Made by `python -m jfb_ip.report ")


@pytest.mark.integration
def test_report_lists_a_failed_job_and_a_varying_override(tiny_sweep, tmp_path, capsys):
    """A failed job (metrics.json with "error") is listed with its error, not averaged; an override that differs
    between runs (here the extra job's lr) becomes the row's setting."""
    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, sweep, ignore=shutil.ignore_patterns("wandb", "*.ckpt"))
    jobs = sorted(d for d in sweep.iterdir() if (d / ".hydra").is_dir())
    failed = sweep / "9_failed"
    shutil.copytree(jobs[0], failed)
    (failed / "metrics.json").write_text(json.dumps({"error": "out of memory (CUDA): lower data.batch_size",
                                                     "error_type": "OutOfMemoryError"}))
    other = sweep / "8_lr"
    shutil.copytree(jobs[0], other)
    overrides = yaml.safe_load((other / ".hydra" / "overrides.yaml").read_text()) + ["module.optimizer.lr=0.01"]
    (other / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    assert main([str(sweep), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "Failed runs:" in out and "`9_failed`" in out and "out of memory" in out
    res = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [f["error"] for f in res["failed"]] == ["out of memory (CUDA): lower data.batch_size"]
    settings = sorted(r["setting"] for r in res["rows"])
    assert settings == ["", "", "module.optimizer.lr=0.01"]


def _run_dir(root, name: str, metrics_text: str):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text(metrics_text)
    return run


def test_a_run_with_an_unreadable_metrics_json_is_skipped_with_one_warning(tmp_path, capsys):
    good = {"config": {"seed": 0}, "test": {"model": {"psnr": 30.5, "ssim": 0.8}}}
    _run_dir(tmp_path, "good", json.dumps(good))
    truncated = _run_dir(tmp_path, "truncated", json.dumps(good)[:25])  # a job killed while writing it
    listed = _run_dir(tmp_path, "listed", "[1, 2]")
    assert main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "JSONDecodeError" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and len(err.strip().splitlines()) == 2, err
    assert f"skipped the run {truncated}: its metrics.json is not valid JSON" in warnings[1]
    assert f"skipped the run {listed}: its metrics.json holds a list" in warnings[0]
    res = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [row["psnr"] for row in res["rows"]] == [30.5]
    assert "(2 with an unreadable metrics.json left out)" in (tmp_path / "rep" / "report.md").read_text()


def test_a_report_without_one_readable_run_ends_in_one_line(tmp_path, capsys):
    _run_dir(tmp_path, "truncated", '{"test": {"model": {"psnr": 3')
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "none of the 1 run(s)" in err.splitlines()[-1]


def test_report_on_a_directory_without_runs_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no finished runs" in capsys.readouterr().err


@pytest.mark.integration
def test_a_run_written_to_paths_output_dir_keeps_its_hydra_record(tmp_path):
    """train.py paths.output_dir=<dir>: Hydra writes .hydra/ into its own run dir; the run's outputs go to <dir>, and
    the record is copied beside them, so the report reads the run (its choices and overrides) from <dir> alone."""
    from conftest import TINY, run_train

    out = tmp_path / "elsewhere"
    r = run_train([*TINY, "backward=implicit", f"paths.output_dir={out}", f"hydra.run.dir={tmp_path}/hydra_run"],
                  tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    overrides = yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    assert f"paths.output_dir={out}" in overrides and (tmp_path / "hydra_run" / ".hydra").is_dir()
    res = report([out], tmp_path / "rep")
    assert [(row["method"], row["task"], row["backward"]) for row in res["rows"]] == [("degrad", "deblur", "implicit")]
