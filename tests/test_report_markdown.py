"""python -m jfb_ip.report --markdown / --write FILE --section NAME on small hand-written run directories."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from jfb_ip.report import main

ROOT = Path(__file__).resolve().parents[1]


def fake_run(root: Path, name: str, backward: str, seed: int, psnr: float) -> Path:
    """A finished run as train.py leaves it: metrics.json beside .hydra/ (the Hydra choices and overrides)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    choices = {"method": "degrad", "task": "deblur", "backward": backward}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"backward={backward}", f"seed={seed}"]))
    metrics = {"config": {"seed": seed},
               "test": {"model": {"psnr": psnr, "ssim": 0.5}, "wiener": {"psnr": 25.0, "ssim": 0.4},
                        "measurement": {"psnr": 23.0, "ssim": 0.3}},
               "train": {"step_time_s_median": 0.25, "steps": 20}, "wall_time_s": 12.0}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    fake_run(root, "0_jfb", "jfb", 0, 30.0)
    fake_run(root, "1_jfb", "jfb", 1, 31.0)
    fake_run(root, "2_implicit", "implicit", 0, 29.0)
    return root


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def table_rows(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("| degrad |")]


def test_write_replaces_the_section_and_leaves_the_rest(sweep, tmp_path):
    doc = tmp_path / "results.md"
    before, after = "# Results\n\nintro line\n\n", "\n\nclosing line\n"
    doc.write_text(before + "<!-- report:deblur -->\nan old table | 1 |\n<!-- /report:deblur -->" + after)
    args = [str(sweep), "--write", str(doc), "--section", "deblur"]
    assert main(args) == 0
    first = doc.read_text()
    assert first.startswith(before) and first.endswith(after) and "an old table" not in first
    block = first.split("<!-- report:deblur -->\n")[1].split("<!-- /report:deblur -->")[0]
    assert block.splitlines()[0] == (f"Made by `python -m jfb_ip.report {' '.join(args)}` at commit {head_commit()} "
                                     f"from 3 run(s).")
    rows = table_rows(block)
    # seeds 0 and 1 of jfb: mean 30.5, sample std sqrt(0.5) = 0.707
    assert len(rows) == 2 and any("| jfb |" in r and "| 30.50 ± 0.71 |" in r for r in rows)
    assert any("| implicit |" in r and "| 29.00 |" in r for r in rows)
    assert not (sweep / "report").exists()  # --write without --out writes no report directory

    # a regenerated table replaces the old one: one section, the new figure, nothing appended
    fake_run(sweep, "3_jfb", "jfb", 2, 32.0)
    assert main(args) == 0
    second = doc.read_text()
    assert second.count("<!-- report:deblur -->") == 1 and second.count("Made by") == 1
    assert second.startswith(before) and second.endswith(after)
    assert any("| jfb |" in r and "| 31.00 ± 1.00 |" in r for r in table_rows(second))


def test_markdown_prints_the_block_only(sweep, capsys):
    assert main([str(sweep), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Made by `python -m jfb_ip.report ") and f"at commit {head_commit()}" in out.splitlines()[0]
    assert len(table_rows(out)) == 2 and "wrote" not in out
    assert not (sweep / "report").exists()


def test_write_refuses_a_file_without_the_markers(sweep, tmp_path, capsys):
    doc = tmp_path / "notes.md"
    doc.write_text("<!-- report:other -->\n<!-- /report:other -->\n")
    with pytest.raises(SystemExit):
        main([str(sweep), "--write", str(doc), "--section", "deblur"])
    assert "<!-- report:deblur -->" in capsys.readouterr().err
    assert doc.read_text() == "<!-- report:other -->\n<!-- /report:other -->\n"
    with pytest.raises(SystemExit):
        main([str(sweep), "--write", str(doc)])
    assert "--section" in capsys.readouterr().err


def test_the_tv_column_averages_the_tv_rows_and_is_absent_without_them(tmp_path):
    from jfb_ip.report import report

    root = tmp_path / "runs"
    for seed, tv in ((0, 28.0), (1, 29.0)):
        run = fake_run(root, f"{seed}_jfb", "jfb", seed, 30.0)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["test"]["tv"] = {"psnr": tv, "ssim": 0.45}
        (run / "metrics.json").write_text(json.dumps(metrics))
    res = report([root], tmp_path / "rep")
    assert res["rows"][0]["tv_psnr"] == pytest.approx(28.5) and res["rows"][0]["tv_psnr_std"] > 0
    assert "| TV PSNR |" in res["markdown"] and "| 28.50 ± 0.71 |" in res["markdown"]
    plain = report([fake_run(tmp_path / "other", "0_jfb", "jfb", 0, 30.0)], tmp_path / "rep2")
    assert plain["rows"][0]["tv_psnr"] is None and "TV PSNR" not in plain["markdown"]
