"""Hydra multiruns: a failing job keeps the others' results, an Optuna study survives a diverging trial, and the
SLURM / submitit launchers compose into one task per device that Lightning does not re-launch."""
from __future__ import annotations

import json
import math

import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import CONF, TINY, run_train

TINY_MULTIRUN = [o for o in TINY if not o.startswith(("debug=", "logger="))]


def compose_with_hydra(overrides: list[str], out_dir):
    """The train config with its ``hydra`` node kept, so the launcher's own interpolations resolve."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def _jobs(sweep) -> dict[int, dict]:
    """job number -> (its metrics.json, its overrides), from the job directories Hydra made."""
    out = {}
    for d in sweep.iterdir():
        if d.is_dir() and (d / ".hydra").is_dir():
            out[int(d.name.split("_")[0])] = {"metrics": json.loads((d / "metrics.json").read_text()),
                                              "overrides": yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())}
    return out


@pytest.mark.integration
def test_failing_job_keeps_the_other_jobs_and_records_its_error(tmp_path):
    """grid_images=0 is refused at config time (ConfigError); in a multirun that job writes metrics.json with the
    error and the sweep still runs the next job, then exits 1 with one line naming the failed job's metrics.json."""
    sweep = tmp_path / "sweep"
    r = run_train(["-m", "grid_images=0,2", "debug=fast_dev_run", *TINY_MULTIRUN, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "JobFailed" not in r.stderr, r.stderr[-3000:]
    summary = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert summary == [f"error: 1 of 2 jobs failed, each with its error in its metrics.json: "
                       f"{next(sweep.glob('0_*'))}/metrics.json (ConfigError)"], r.stderr[-3000:]
    jobs = _jobs(sweep)
    assert sorted(jobs) == [0, 1]
    failed, ok = jobs[0], jobs[1]
    assert "grid_images=0" in failed["overrides"] and "grid_images=2" in ok["overrides"]
    assert failed["metrics"]["error_type"] == "ConfigError" and "grid_images" in failed["metrics"]["error"]
    assert "test" not in failed["metrics"]
    assert "error" not in ok["metrics"] and ok["metrics"]["test"]["n_images"] == 4
    assert all(math.isfinite(ok["metrics"]["test"][row]["psnr"]) for row in ("measurement", "wiener", "model"))


@pytest.mark.integration
def test_optuna_study_survives_a_diverging_trial(tmp_path):
    """hparams_search=optuna with a 2-point grid over solver.bound: at 1e-6 every sample counts as diverged and the
    trial raises TrainingDiverged (module.max_skipped_batches=1); it scores -inf and the study completes, its best
    value being the other trial's last validation PSNR as that job recorded it."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e .[sweep]")
    sweep = tmp_path / "study"
    params = "{module.optimizer.lr:'choice(1e-3)',module.optimizer.weight_decay:'choice(0.0)',solver.bound:'choice(1e-6,1000.0)'}"
    r = run_train(["hparams_search=optuna", f"++hydra.sweeper.params={params}", "hydra/sweeper/sampler=grid",
                   "hydra.sweeper.n_trials=2", "module.max_skipped_batches=1", "debug=smoke", "logger=none",
                   "callbacks=none", *TINY_MULTIRUN, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = list(_jobs(sweep).values())
    assert len(jobs) == 2
    diverged = next(j for j in jobs if "solver.bound=1e-06" in j["overrides"])
    fine = next(j for j in jobs if "solver.bound=1000.0" in j["overrides"])
    assert diverged["metrics"]["error_type"] == "TrainingDiverged"
    assert diverged["metrics"]["objective"] is None and diverged["metrics"]["non_finite"]  # -inf, as JSON null
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_params"]["solver.bound"] == 1000.0
    assert result["best_value"] == pytest.approx(fine["metrics"]["val"]["val/psnr"], abs=1e-9)
    assert 10 < result["best_value"] < 60


def test_optuna_config_composes_and_builds_its_sweeper(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e .[sweep]")
    cfg = compose_with_hydra(["hparams_search=optuna"], tmp_path)
    assert cfg.optimized_metric == "val/psnr"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.direction == "maximize"
    sweeper = hydra.utils.instantiate(cfg.hydra.sweeper)
    assert type(sweeper).__name__ == "OptunaSweeper"
    assert type(sweeper.sweeper.sampler).__name__ == "TPESampler"


@pytest.mark.parametrize("devices,nodes", [(4, 1), (2, 3)])
def test_slurm_launcher_runs_one_task_per_device_without_relaunch(devices, nodes, tmp_path, monkeypatch):
    """launcher=slurm asks SLURM for trainer.devices tasks (and GPUs) per node on trainer.num_nodes nodes. Inside
    such a task (the SLURM variables srun sets for it), Lightning's DDP takes its rank from SLURM and creates no
    processes itself; outside SLURM the same trainer would re-launch the script (the multirun + DDP trap)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[slurm]")
    import lightning as L

    cfg = compose_with_hydra(["launcher=slurm", "trainer=cpu", f"trainer.devices={devices}",
                              f"trainer.num_nodes={nodes}", "+trainer.strategy=ddp"], tmp_path)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert (launcher.params["tasks_per_node"], launcher.params["gpus_per_node"], launcher.params["nodes"]) == \
        (devices, devices, nodes)
    kwargs = {k: v for k, v in cfg.trainer.items() if k != "_target_"}
    outside = L.Trainer(**kwargs, logger=False, enable_checkpointing=False)
    assert not outside.strategy.cluster_environment.creates_processes_externally
    rank = devices * nodes - 1  # the last task of the job
    for k, v in {"SLURM_NTASKS": devices * nodes, "SLURM_NTASKS_PER_NODE": devices, "SLURM_NNODES": nodes,
                 "SLURM_PROCID": rank, "SLURM_LOCALID": devices - 1, "SLURM_NODEID": nodes - 1,
                 "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": 1, "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(k, str(v))
    inside = L.Trainer(**kwargs, logger=False, enable_checkpointing=False)
    env = inside.strategy.cluster_environment
    assert type(env).__name__ == "SLURMEnvironment" and env.creates_processes_externally
    assert (inside.global_rank, inside.world_size, inside.local_rank, inside.node_rank) == \
        (rank, devices * nodes, devices - 1, nodes - 1)


@pytest.mark.integration
def test_submitit_local_launcher_runs_a_job(tmp_path):
    """launcher=submitit_local: the job runs in its own process through submitit (the code path of
    launcher=slurm) and writes its results into the sweep's job directory."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[slurm]")
    sweep = tmp_path / "sweep"
    r = run_train(["-m", "launcher=submitit_local", "seed=3", "debug=fast_dev_run", *TINY_MULTIRUN,
                   f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = _jobs(sweep)
    assert list(jobs) == [0] and jobs[0]["metrics"]["config"]["seed"] == 3
    assert math.isfinite(jobs[0]["metrics"]["test"]["model"]["psnr"])
    logs = list((sweep / ".submitit").glob("*/*_0_log.out"))
    assert logs, "submitit wrote no job log"
