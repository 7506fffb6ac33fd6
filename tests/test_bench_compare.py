"""python -m jfb_ip.bench.compare on a tiny budget: rows come from each run's metrics.json."""
from __future__ import annotations

import json

import pytest

from jfb_ip.bench import compare


# trains and evaluates several runs end to end (~85 s on 2 cores): `make test-full` runs it
@pytest.mark.slow
@pytest.mark.integration
def test_compare_table_reports_each_runs_own_metrics_and_convergence(tmp_path):
    res = compare.main(["--methods", "luser_dw,lu_dncnn", "--steps", "2", "--image-size", "16", "--batch", "2",
                        "--out", str(tmp_path), "data.dataset.eval_crops=4", "data.dataset.train_samples=4"])
    for name in ("luser_dw", "lu_dncnn"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert res[name]["test"]["model"] == metrics["test"]["model"]
    # LUSER's inner solves are checked (a fixed point), LU-DnCNN has none
    assert 0.0 <= res["luser_dw"]["solver"]["converged_fraction"] <= 1.0
    assert res["lu_dncnn"]["solver"] is None
    lines = {ln.split()[0]: ln.split() for ln in compare.table(res).splitlines()[1:]}
    assert lines["lu_dncnn"][3] == "-"
    assert float(lines["luser_dw"][3]) == round(res["luser_dw"]["solver"]["converged_fraction"], 2)
