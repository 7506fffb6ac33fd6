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
        jfb = rows["jfb", s]
        assert rows["unroll", s]["memory_ratio_to_jfb"] > 1  # 4 unrolled steps keep 4 graphs of T
        for m in MODES:  # ratios are the raw numbers divided by jfb's, measured in the same run
            r = rows[m, s]
            assert r["time_ratio_to_jfb"] == pytest.approx(r["time_s"] / jfb["time_s"])
            assert r["memory_ratio_to_jfb"] == pytest.approx(r["memory_bytes"] / jfb["memory_bytes"])
        assert jfb["floor_time_s"] > 0
        impl = rows["implicit", s]
        assert impl["bwd_tol"] == impl["fwd_tol"] and 1 <= impl["bwd_iters"] <= 10
        assert impl["bwd_residual"] <= impl["bwd_tol"]  # the backward solve reached its tolerance
        # JFB is a descent direction (paper 000 Thm 4.1) but not the implicit gradient
        assert 0 < jfb["grad_cos_to_implicit"] < 1 - 1e-6


def test_json_written_with_documented_keys(bench):
    payload, path = bench
    data = json.loads(path.read_text())
    assert data["device"] == payload["device"]
    assert data["rows"] and all(set(KEYS) <= set(r) for r in data["rows"])
    assert data["config"]["unroll_steps"] == 4
