"""The backward-mode benchmark (Fig. 2 of paper 000) on a tiny configuration."""
from __future__ import annotations

import json

import pytest
import torch

from jfb_ip.bench.backward import KEYS, MODES, PEERS, main


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: threads only add contention (a loaded 2-core machine slows 2 threads ~50x)
    argv = ["--sides", "12", "16", "--batch", "2", "--depth", "3", "--width", "8", "--repeats", "1", "--warmup", "0",
            "--max-iter", "10", "--unroll-steps", "4", "--json", str(out / "b.json"), "--png", ""]
    try:
        yield main(argv), out / "b.json"
    finally:
        torch.set_num_threads(threads)


def test_every_mode_has_a_row_per_side(bench):
    payload, _ = bench
    rows = {(r["mode"], r["side"]): r for r in payload["rows"]}
    modes = list(MODES) + ([] if payload["skipped"] else list(PEERS))
    assert set(rows) == {(m, s) for m in modes for s in (12, 16)}
    assert len(payload["rows"]) == len(rows)
    for r in payload["rows"]:
        assert r["time_s"] > 0 and r["memory_bytes"] > 0 and r["batch"] == 2
        assert (r["floor_time_s"] is not None) == (r["mode"] == "jfb")
    for s in (12, 16):
        assert rows["unroll", s]["memory_ratio_to_jfb"] > 1  # 4 unrolled steps keep 4 graphs of T
        assert rows["implicit", s]["grad_cos_to_implicit"] == pytest.approx(1.0, abs=1e-6)
        assert rows["jfb", s]["time_ratio_to_jfb"] == 1.0 and rows["jfb", s]["floor_time_s"] > 0
        assert rows["implicit", s]["bwd_tol"] == rows["implicit", s]["fwd_tol"]
        assert rows["implicit", s]["bwd_iters"] >= 1
        assert -1 <= rows["jfb", s]["grad_cos_to_implicit"] <= 1


def test_json_written_with_documented_keys(bench):
    payload, path = bench
    data = json.loads(path.read_text())
    assert data["device"] == payload["device"]
    assert data["rows"] and all(set(KEYS) <= set(r) for r in data["rows"])
    assert data["config"]["unroll_steps"] == 4
