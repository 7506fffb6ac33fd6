"""The backward-mode benchmark (Fig. 2 of Liu et al. [1]) on a tiny configuration."""
from __future__ import annotations

import json

import pytest
import torch

from jfb_ip.bench.backward import FORWARD_KEYS, KEYS, MATCHED, MODES, PEERS, SETTINGS, main, missing_peers


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
    rows = {(r["mode"], r["side"]): r for r in payload["rows"] if r["peer_settings"] is None}
    peers = [m for m in PEERS if m not in payload["skipped"]]
    ours = list(MODES) + (list(MATCHED) if peers else [])
    assert set(rows) == {(m, s) for m in ours for s in (12, 16)}
    peer_rows = {(r["mode"], r["side"], r["peer_settings"]) for r in payload["rows"] if r["peer_settings"]}
    assert peer_rows == {(m, s, t) for m in peers for s in (12, 16) for t in SETTINGS}
    assert len(payload["rows"]) == len(rows) + len(peer_rows)
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
        # JFB is a descent direction (Liu et al. [1] Thm 4.1) but not the implicit gradient
        assert 0 < jfb["grad_cos_to_implicit"] < 1 - 1e-6


def test_json_written_with_documented_keys(bench):
    payload, path = bench
    data = json.loads(path.read_text())
    assert data["device"] == payload["device"]
    assert data["rows"] and all(set(KEYS) <= set(r) for r in data["rows"])
    assert all(r["peer_settings"] in SETTINGS for r in data["rows"] if r["peer"])
    assert data["config"]["unroll_steps"] == 4


def _peer(name):
    """Skip (with the reason) when a peer package is absent or fails to import."""
    why = missing_peers().get(name)
    if why:
        pytest.skip(f"peer rows not run: {why}")


@pytest.mark.parametrize("peer", ["torchdeq", "deepinv"])
def test_peer_rows_carry_settings_and_ratios_from_raw_numbers(bench, peer):
    _peer(peer)
    payload, _ = bench
    ours = {(r["mode"], r["side"]): r for r in payload["rows"] if r["peer_settings"] is None}
    rows = [r for r in payload["rows"] if r["mode"].startswith(peer + "_")]
    assert len(rows) == 2 * 2 * 2  # jfb and implicit, two sides, default and matched
    for r in rows:
        assert r["peer"] == peer and r["peer_settings"] in SETTINGS
        kind = r["mode"].split("_", 1)[1]
        assert r["vs"] == (kind + "_matched" if r["peer_settings"] == "matched" else kind)
        assert r["time_ratio_ours_to_peer"] == pytest.approx(ours[r["vs"], r["side"]]["time_s"] / r["time_s"])
        assert r["fwd_iters"] >= 1 and r["memory_bytes"] > 0
        if kind == "implicit":
            assert r["bwd_iters"] >= 1
    assert payload["config"]["peers"][peer]  # the version that ran


def test_matched_jfb_ip_rows_use_the_absolute_regulariser(bench):
    payload, _ = bench
    if not [m for m in PEERS if m not in payload["skipped"]]:
        pytest.skip("no peer installed: no matched rows (pip install -e .[peers])")
    rows = {(r["mode"], r["side"]): r for r in payload["rows"] if r["peer_settings"] is None}
    assert payload["config"]["lam"] == 1e-4 and payload["config"]["m"] == 5
    for s in (12, 16):
        assert rows["implicit_matched", s]["bwd_tol"] == rows["implicit_matched", s]["fwd_tol"]
        assert 0 < rows["jfb_matched", s]["grad_cos_to_implicit"] < 1


@pytest.mark.parametrize("peer", ["torchdeq", "deepinv"])
def test_forward_rows(bench, peer):
    _peer(peer)
    payload, path = bench
    rows = [r for r in json.loads(path.read_text())["forward"] if r["peer"] == peer]
    solvers = ("anderson", "broyden") if peer == "torchdeq" else ("anderson",)  # deepinv has no Broyden
    assert {(r["solver"], r["side"], r["peer_settings"]) for r in rows} == \
        {(v, s, t) for v in solvers for s in (12, 16) for t in SETTINGS}
    for r in rows:
        assert set(FORWARD_KEYS) <= set(r)
        assert 1 <= r["evals"] <= r["max_iter"] and 1 <= r["peer_evals"] <= r["max_iter"]
        assert r["evals_ratio"] == pytest.approx(r["evals"] / r["peer_evals"])
        assert r["time_ratio"] == pytest.approx(r["time_s"] / r["peer_time_s"])
        assert r["residual"] >= 0 and r["peer_residual"] >= 0
        if r["solver"] == "anderson" and r["peer_settings"] == "matched" and peer == "torchdeq":
            # the same algorithm (m, lam, damping, stop rule); jfb-ip stops each sample when it first meets
            # tol, torchdeq when all meet it at the same iteration: never more evaluations
            assert r["evals"] <= r["peer_evals"]


def test_absent_peer_is_skipped_with_its_reason(monkeypatch, tmp_path):
    import jfb_ip.bench.backward as bb
    # deepinv reported absent on top of what is really installed here (torchdeq may be absent too: CI)
    really_missing = bb.missing_peers()
    monkeypatch.setattr(bb, "missing_peers",
                        lambda: {**really_missing, "deepinv": "deepinv not installed (pip install -e .[peers])"})
    msgs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        payload = bb.run([12], 1, modes=("jfb", "deepinv_jfb", "deepinv_implicit"), repeats=1, depth=2, width=4,
                         max_iter=3, warmup=0, forward=False, log=msgs.append)
    finally:
        torch.set_num_threads(threads)
    assert payload["skipped"] == ["deepinv_jfb", "deepinv_implicit"]
    assert any("deepinv not installed" in m for m in msgs)
    assert [r["mode"] for r in payload["rows"]] == ["jfb"]
