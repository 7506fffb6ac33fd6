"""python -m jfb_ip.bench.operators: both Radon implementations timed in one run, and their results compared."""
from __future__ import annotations

import json
import math

from jfb_ip.bench import operators


def test_operators_bench_times_both_implementations_and_they_agree(tmp_path, capsys):
    rows = operators.main(["--sizes", "12", "20", "--batch", "2", "--repeats", "2", "--json", str(tmp_path / "o.json")])
    assert [r["side"] for r in rows] == [12, 20] and all(r["sparse"] for r in rows)
    for r in rows:
        assert r["A_rel_diff"] < 1e-5 and r["A_adjoint_rel_diff"] < 1e-5  # float32 rounding, not another operator
        for name in ("A", "A_adjoint"):
            assert r[f"{name}_ratio"] == r[f"{name}_ms_kernels"] / r[f"{name}_ms_sparse"]
            assert math.isfinite(r[f"{name}_ratio"]) and r[f"{name}_ms_sparse"] > 0
    assert json.loads((tmp_path / "o.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| 20 | 11 x 29 |" in capsys.readouterr().out  # round(200 * 20 / 362) angles, ceil(20 sqrt 2) bins
