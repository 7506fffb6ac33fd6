"""DDP with real processes (trainer=ddp_sim: 2 CPU processes, gloo): validation and test use every shard, the
test table equals one process's on the same weights and data, each process tests different images, only rank 0
writes; and the Hydra multirun + DDP re-launch trap is refused before any process starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, compose_cfg, for_task
from jfb_ip.lit.calibration import psnr_score
from jfb_ip.lit.checks import check_launch, instantiate_group
from jfb_ip.lit.errors import ConfigError
from jfb_ip.lit.run import build_module, evaluate
from jfb_ip.methods import Wiener

# 5 val and 5 test crops of 20 px: shards of 3 and 2 images, 2 and 1 batches per process (uneven on purpose);
# at this size each shard alone would pick another Wiener lambda than the whole split (checked below)
DATA = ["data.image_size=20", "data.batch_size=2", "data.eval_batch_size=2", "data.dataset.train_samples=8",
        "data.dataset.eval_crops=5"]
OVERRIDES = [o for o in TINY if not o.startswith(("debug=", "data."))] + DATA
DDP_TRAIN = ["trainer=ddp_sim", "trainer.max_steps=2", "trainer.check_val_every_n_epoch=1",
             "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """train.py trainer=ddp_sim: 2 training steps, one validation epoch, the test; in 2 processes."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    _run("train.py", OVERRIDES + DDP_TRAIN + [f"hydra.run.dir={out}"])
    return out


def _close(a: dict, b: dict, tol: float = 1e-4) -> None:
    for row in ("measurement", "wiener", "model"):
        for k in ("psnr", "ssim"):
            assert a[row][k] == pytest.approx(b[row][k], abs=tol), (row, k)
            assert a["per_image"][row][k] == pytest.approx(b["per_image"][row][k], abs=tol), (row, k)


def _png(path: Path) -> torch.Tensor:
    return torch.tensor(list(Image.open(path).getdata()), dtype=torch.float32)


@pytest.mark.integration
def test_ddp_test_table_equals_one_process_and_shards_differ(ddp_run, tmp_path):
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    ddp = metrics["test"]
    # one process on the same weights (the DDP run's last.ckpt) and the same test images
    single = evaluate(compose_cfg("evaluate", [f"ckpt_path={ddp_run / 'checkpoints' / 'last.ckpt'}", "trainer=cpu",
                                               "logger=none"], tmp_path))["test"]
    assert "distributed" not in single and ddp["n_images"] == single["n_images"] == 5
    _close(ddp, single)
    assert ddp["solver"]["n_samples"] == single["solver"]["n_samples"] == 5
    assert ddp["solver"]["fwd_iters_mean"] == pytest.approx(single["solver"]["fwd_iters_mean"])
    # each process tested its own images: rank of each test image, in image order, and no image twice
    dist = ddp["distributed"]
    assert dist["world_size"] == 2 and dist["rank_of_image"] == [0, 1, 0, 1, 0]
    assert dist["images_per_rank"] == [3, 2] and dist["repeated_images_dropped"] == 0
    # examples.png holds the first test images of the whole split, as in one process
    assert torch.equal(_png(ddp_run / "examples.png"), _png(tmp_path / "examples.png"))
    # only rank 0 wrote: one metrics.json, Hydra's log of process 1 beside it, no output dir of its own
    assert (ddp_run / "train_ddp_process_1.log").is_file()
    assert metrics["train"]["steps"] == 2


@pytest.mark.integration
def test_ddp_wiener_lambda_is_searched_on_every_shard(ddp_run, tmp_path):
    """The lambda in metrics.json is the best over the whole validation split, which neither shard alone picks."""
    lam = json.loads((ddp_run / "metrics.json").read_text())["test"]["wiener_lambda"]
    cfg = compose_cfg("train", OVERRIDES + ["trainer=cpu"], tmp_path)
    data, module = instantiate_group(cfg, "data"), build_module(cfg, {})
    val = data.split("val")
    x = torch.stack([val[i][0] for i in range(len(val))])
    meas = module.seeded_measurement(x, torch.arange(len(val)), "val")

    def best(rows: list[int]) -> float:
        w = Wiener(prior=cfg.references.wiener.prior)
        w.calibrate_update(meas.subset(torch.tensor([i in rows for i in range(len(val))])), x[rows], psnr_score)
        w.calibrate_end()
        return float(w.lam)

    whole, shard0, shard1 = best([0, 1, 2, 3, 4]), best([0, 2, 4]), best([1, 3])
    assert shard0 != whole and shard1 != whole  # so the check below can fail
    assert lam == pytest.approx(whole)


@pytest.mark.integration
def test_ddp_evaluate_of_a_checkpoint_equals_one_process(ddp_run, tmp_path):
    ckpt = ddp_run / "checkpoints" / "last.ckpt"
    _run("evaluate.py", [f"ckpt_path={ckpt}", "trainer=ddp_sim", "logger=none", f"hydra.run.dir={tmp_path / 'ddp'}"])
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["test"]
    single = evaluate(compose_cfg("evaluate", [f"ckpt_path={ckpt}", "trainer=cpu", "logger=none"],
                                  tmp_path / "one"))["test"]
    _close(ddp, single)
    assert ddp["distributed"]["images_per_rank"] == [3, 2]


@pytest.mark.integration
def test_multirun_with_ddp_is_refused_before_any_process_starts(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    wiener = [o for o in OVERRIDES if not o.startswith(("method.", "solver."))]
    r = subprocess.run([sys.executable, "train.py", "-m", "method=wiener", "trainer=ddp_sim", "seed=0,1", *wiener,
                        f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2  # each job of the sweep failed on its own, with the fix in its message
    for job in jobs:
        error = json.loads((job / "metrics.json").read_text())["error"]
        assert "multirun" in error and "launcher=slurm" in error and "torchrun" in error
    assert not list(sweep.rglob("*ddp_process*"))  # Lightning never re-ran the command


# two 2-process runs: in `make test-full` to keep `make test` under its time (the failed-jobs summary it once tripped,
# rank 1 judging a metrics.json rank 0 had not written yet, is test_failed_jobs_summary_is_rank_0s_only's)
@pytest.mark.slow
@pytest.mark.integration
def test_multirun_with_ddp_under_torchrun_runs_each_job_once_in_2_processes(tmp_path):
    """The local spawn-free path: torchrun starts the 2 processes, each runs the same sweep in step, Lightning
    launches nothing; every job is one 2-process DDP run written once by rank 0."""
    sweep = tmp_path / "sweep"
    _run("-m", ["torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "-m", "method=wiener",
                "trainer=ddp_sim", "seed=0,1", *[o for o in OVERRIDES if not o.startswith(("method.", "solver."))],
                f"hydra.sweep.dir={sweep}"])
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert [p.parent.name[:2] for p in jobs] == ["0_", "1_"]
    for p in jobs:
        test = json.loads(p.read_text())["test"]
        assert test["distributed"]["images_per_rank"] == [3, 2] and test["wiener_lambda_tuned_on_val"]
    assert not list(sweep.rglob("*ddp_process*"))


class _Step(torch.nn.Module):
    """DDP wraps a module's forward: here, the LightningModule's training step (what Lightning's wrapper does)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module.training_loss(batch)


def _diverged_batch_worker(rank: int, init_file: str, out_dir: str, extra: list[str]) -> None:
    """Rank 0's samples all diverge (NaN images), rank 1's do not; then every rank's samples diverge."""
    import copy
    import datetime

    torch.set_num_threads(1)
    # a collective one process never joins fails after 2 minutes instead of hanging the test run
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    module = build_module(compose_cfg("train", TINY + extra, Path(out_dir) / f"cfg{rank}"), {})
    x, idx = torch.rand(2, 3, 16, 16), torch.arange(2) + 2 * rank
    bad = torch.full_like(x, float("nan"))
    batch = lambda images: (images, module.seeded_measurement(images, idx, "val"), idx)  # noqa: E731
    alone = copy.deepcopy(module)  # rank 1's own gradient, without DDP
    alone.training_loss(batch(x)).backward()
    ddp = torch.nn.parallel.DistributedDataParallel(_Step(module))
    ddp(batch(bad if rank == 0 else x)).backward()  # must not hang: rank 0 joins the all-reduce with a zero loss
    out = {"names": [n for n, _ in module.method.named_parameters()],
           "grads": [p.grad.clone() for p in module.method.parameters()],
           "alone": [p.grad.clone() for p in alone.method.parameters()], "skipped": module.skipped_samples}
    out["none"] = module.training_loss(batch(bad)) is None  # all processes diverged: all skip the step
    out["skipped_after"], out["in_a_row"] = module.skipped_samples, module._skipped_in_a_row
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("extra", [[], ["experiment=de_grad_jfb"]], ids=["default", "liu_map"])
@pytest.mark.integration
def test_a_batch_that_diverges_on_one_process_keeps_ddp_in_step(tmp_path, extra):
    """Real processes (gloo): a process whose samples all diverge contributes a zero gradient, so the other's
    all-reduce completes and both hold half of its gradient; the step is skipped only when all processes diverged,
    and the skipped-sample count is the same on every process. The default (anchored at a Wiener estimate whose
    lambda both processes tune together on this batch, gate 0: only its two scalars have a gradient) checks that
    the NaN process neither shifts the lambda nor aliases its scalars' zero gradients; the map of Liu et al. [1], the net's."""
    torch.multiprocessing.spawn(_diverged_batch_worker, args=(str(tmp_path / "init"), str(tmp_path), extra), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, g0, g1, alone in zip(r0["names"], r0["grads"], r1["grads"], r1["alone"]):
        assert torch.allclose(g0, g1) and torch.allclose(g1, alone / 2, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in r1["alone"])
    assert r0["skipped"] == r1["skipped"] == 2 and r0["none"] and r1["none"]
    assert r0["skipped_after"] == r1["skipped_after"] == 6 and r0["in_a_row"] == r1["in_a_row"] == 1


def _penalty_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One training loss with the contraction penalty (its power iteration and double backward run inside DDP's
    forward), on each process's own batch: alone, then under DDP."""
    import copy
    import datetime

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    overrides = for_task(TINY, "mri4x") + ["task=mri4x", "method.contraction_penalty=10.0", "method.inject=input",
                                           "method.contraction_target=0.01",  # active at the untrained tiny net
                                           "method.initializer=task"]  # no Wiener lambda tuned per process
    module = build_module(compose_cfg("train", overrides, Path(out_dir) / f"cfg{rank}"), {})
    x, idx = torch.rand(2, 1, 16, 16), torch.arange(2) + 2 * rank
    batch = (x, module.seeded_measurement(x, idx, "val"), idx)
    alone = copy.deepcopy(module)
    torch.manual_seed(1)  # the power iteration's random start: the same draw alone and under DDP
    loss, _, rec = alone.training_outputs(batch)
    loss.backward()
    ddp = torch.nn.parallel.DistributedDataParallel(_Step(module))
    torch.manual_seed(1)
    ddp(batch).backward()
    torch.save({"names": [n for n, _ in module.method.named_parameters()],
                "ddp": [p.grad.clone() for p in module.method.parameters()],
                "alone": [p.grad.clone() for p in alone.method.parameters()],
                "penalty": rec.penalty.item()}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_the_contraction_penalty_under_ddp_averages_the_processes_gradients(tmp_path):
    """The penalty's autograd.grad calls inside DDP's forward leave DDP's reducer alone: after backward every
    process holds the mean of the gradients each process computes on its own batch without DDP."""
    torch.multiprocessing.spawn(_penalty_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["penalty"] > 0 and r1["penalty"] > 0  # the penalty is active on both processes
    for name, d0, d1, a0, a1 in zip(r0["names"], r0["ddp"], r1["ddp"], r0["alone"], r1["alone"]):
        assert torch.allclose(d0, d1) and torch.allclose(d0, (a0 + a1) / 2, rtol=1e-4, atol=1e-8), name


def _trainer(strategy: str):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                     enable_model_summary=False)


def test_check_launch_refuses_a_relaunch_in_a_multirun_and_spawn():
    check_launch(_trainer("ddp"), multirun=False)
    with pytest.raises(ConfigError, match="launcher=slurm"):
        check_launch(_trainer("ddp"), multirun=True)
    with pytest.raises(ConfigError, match="ddp_spawn"):
        check_launch(_trainer("ddp_spawn"), multirun=False)


@pytest.mark.parametrize("environment,variables", [
    ("TorchElasticEnvironment", {"RANK": 1, "GROUP_RANK": 0, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 2, "WORLD_SIZE": 2,
                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500, "TORCHELASTIC_RUN_ID": "x"}),
    ("SLURMEnvironment", {"SLURM_NTASKS": 2, "SLURM_NTASKS_PER_NODE": 2, "SLURM_NNODES": 1, "SLURM_PROCID": 1,
                          "SLURM_LOCALID": 1, "SLURM_NODEID": 0, "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": 1,
                          "SLURM_NODELIST": "node1"}),
])
def test_check_launch_allows_a_multirun_where_processes_exist(environment, variables, monkeypatch):
    """torchrun, or one SLURM task per GPU, starts the processes: Lightning re-runs nothing, a multirun is fine."""
    # the Trainer sets the process-wide rank_zero_only.rank to the simulated rank 1: conftest restores it
    for k, v in variables.items():
        monkeypatch.setenv(k, str(v))
    trainer = _trainer("ddp")
    assert type(trainer.strategy.cluster_environment).__name__ == environment
    check_launch(trainer, multirun=True)


def test_failed_jobs_summary_is_rank_0s_only(tmp_path, monkeypatch):
    """Under torchrun every rank ends the sweep, but only rank 0 writes metrics.json: a job rank 0 has not written
    yet must not count as failed on rank 1, while rank 0 reports a job without one."""
    import time

    from omegaconf import OmegaConf

    from jfb_ip.lit.errors import FailedJobs

    sweep = tmp_path / "sweep"
    for name, metrics in (("0_a", {"test": {}}), ("1_b", None)):
        (sweep / name / ".hydra").mkdir(parents=True)
        if metrics is not None:
            (sweep / name / "metrics.json").write_text(json.dumps(metrics))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    cb = FailedJobs()
    cb.started = time.time() - 60
    monkeypatch.setenv("RANK", "1")
    cb.on_multirun_end(config)  # returns: rank 1 does not judge
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        cb.on_multirun_end(config)
    assert e.value.code == 1
