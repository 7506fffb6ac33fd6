"""The training-memory benchmark (Table 3 of Guan et al. [3]) on a tiny configuration."""
from __future__ import annotations

import json

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from jfb_ip.bench.memory import CONF, KEYS, main, max_batch
from jfb_ip.nets import count_parameters


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "m.json"
    threads = torch.get_num_threads()
    argv = ["--methods", "lu_dncnn", "degrad_jfb", "--tasks", "deblur", "--image-size", "16", "--stages", "2", "4",
            "--iters", "5", "20", "--batches", "1", "2", "--no-paper-sizes", "--threads", "1", "--json", str(out),
            "--png", ""]
    try:
        yield main(argv), out
    finally:
        torch.set_num_threads(threads)


def _row(payload, method, point):
    return next(r for r in payload["rows"] if r["method"] == method and r["iters_or_stages"] == point)


def test_deq_memory_is_flat_in_iterations(bench):
    payload, _ = bench
    lo, hi = _row(payload, "degrad", 5), _row(payload, "degrad", 20)
    assert lo["solver_iters"] == 5 and hi["solver_iters"] == 20  # tol 0: the solver really ran N iterations
    assert 0 < hi["bytes_per_sample"] <= 1.05 * lo["bytes_per_sample"]
    assert max(hi["measured_bytes"]) <= 1.05 * max(lo["measured_bytes"])


def test_unrolled_memory_grows_linearly_in_stages(bench):
    payload, _ = bench
    k2, k4 = _row(payload, "lu_dncnn", 2), _row(payload, "lu_dncnn", 4)
    assert k4["bytes_per_sample"] > 1.8 * k2["bytes_per_sample"]
    assert k4["fixed_bytes"] > 0 and k4["max_batch"]["8GB"] <= k2["max_batch"]["8GB"]


def test_params_match_the_instantiated_method(bench):
    payload, _ = bench
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name, point in (("lu_dncnn", 4), ("degrad", 20)):
            cfg = compose("train", overrides=[f"method={name}", "task=deblur", "data.channels=3"])
            method = hydra.utils.instantiate(cfg.method, _convert_="all")
            assert _row(payload, name, point)["params"] == count_parameters(method)


def test_json_written_with_documented_keys(bench):
    payload, path = bench
    data = json.loads(path.read_text())
    assert data["device"] == payload["device"] == "cpu"
    assert len(data["rows"]) == 4
    for r in data["rows"]:
        assert set(KEYS) <= set(r)
        assert set(r["max_batch"]) == {"8GB", "10GB", "24GB"}
        assert r["task"] == "deblur" and r["backward"] in ("unroll", "jfb")


def test_max_batch_follows_the_papers_rounding():
    gib = 2**30
    assert max_batch(0, gib, 8) == 8 and max_batch(0, 0.9 * gib, 8) == 8  # 8.9 -> even 8
    assert max_batch(7 * gib, 0.6 * gib, 8) == 1  # one sample fits
    assert max_batch(7.5 * gib, gib, 8) is None  # not even one
