"""Every option of every config group composes, instantiates and (for the run groups) trains."""
from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import CONF, TINY, TINY_ANY_DATA, compose_cfg, for_task
from jfb_ip.lit.run import train

GROUPS = sorted(p.name for p in Path(CONF).iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


def test_every_group_has_options():
    assert {"method", "task", "backward", "data", "trainer", "logger", "callbacks", "experiment",
            "hparams_search", "launcher", "debug", "paths", "hydra"} <= set(GROUPS)


# what each option of a group must build (checked against the built object, not just "is not None")
EXPECTED_TYPE = {"method": {"degrad": "DEGRAD", "deprox": "DEProx", "lu_dncnn": "LUDnCNN", "luser_sw": "LUSER",
                            "luser_dw": "LUSER", "wiener": "Wiener", "denoiser": "Denoiser", "pnp_admm": "PnPADMM",
                            "mtdeq": "MTDEQ", "tv": "TV"},
                 "logger": {"wandb": ["WandbLogger"], "csv": ["CSVLogger"], "none": []},
                 "callbacks": {"default": ["KeepingOnExceptionCheckpoint", "ModelCheckpoint", "ModelCheckpoint"],
                               "none": []}}


@pytest.mark.parametrize("group,option", [(g, o) for g in ("method", "task", "solver", "backward", "trainer",
                                                             "logger", "callbacks", "data") for o in options(g)])
def test_option_instantiates(group, option, tmp_path, image_folder, fake_celeba, request):
    extra = {"folder": [f"data.root={image_folder}"], "celeba": [f"data.root={fake_celeba}"]}.get(option, [])
    base = TINY_ANY_DATA if group == "data" else TINY
    if group == "method":  # the tiny net/solver keys belong to DE-GRAD; each method has its own
        base = method_overrides(base, option, request)
    if group == "task":
        base = for_task(base, option)
    cfg = compose_cfg("train", base + [f"{group}={option}"] + (extra if group == "data" else []), tmp_path)
    node = cfg[group]
    if (group, option) in (("trainer", "gpu"), ("trainer", "ddp")) and not torch.cuda.is_available():
        pytest.skip(f"trainer={option} composes; instantiating it needs a GPU")
    if group in ("logger", "callbacks"):
        objs = [hydra.utils.instantiate(c) for c in node.values()] if node else []
        assert sorted(type(o).__name__ for o in objs) == EXPECTED_TYPE[group][option]
    elif group in ("solver", "backward"):
        method = hydra.utils.instantiate(cfg.method, _convert_="all")
        assert (method.solve.forward if group == "solver" else method.solve.mode) == node.get("name", node.get("mode"))
    elif group == "data":
        dm = hydra.utils.instantiate(node)
        dm.setup("fit"), dm.setup("test")
        x, idx = next(iter(dm.train_dataloader()))
        assert x.shape[1:] == (1 if option == "phantoms" else 3, 16, 16) and x.dtype.is_floating_point
    elif group == "method":
        assert type(hydra.utils.instantiate(node, _convert_="all")).__name__ == EXPECTED_TYPE[group][option]
    elif group == "task":
        task = hydra.utils.instantiate(node)
        x = torch.rand(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        meas = task.sample(x, seeds=torch.arange(2))
        shown = meas.as_image()  # y, or the initializer where y is not an image (SR, MRI, CT)
        assert shown.shape == x.shape and (shown - x).abs().mean() > 1e-3  # a real degradation
    else:
        trainer = hydra.utils.instantiate(node)
        assert type(trainer).__name__ == "Trainer" and trainer.max_steps == node.max_steps


NET_SHRINK = {"dncnn": ["method.net.depth=3", "method.net.width=8"],
              "unet": ["method.net.features=[4,8]", "method.net.convs=1"],
              "tnrd": ["method.net.n_filters=6", "method.net.kernel_size=3", "method.net.n_knots=5",
                       "~method.net.gamma"]}  # the deblurring specialization's scale of the conv nets


@pytest.mark.parametrize("option", options("method/net"))
def test_degrad_net_option_trains(option, tmp_path):
    """Each method/net option builds its network with the channels DE-GRAD feeds it and trains two steps; the
    gradient-form TNRD is fed x alone, and its option turns the injection off."""
    base = [o for o in TINY if not o.startswith("method.net.")]
    cfg = compose_cfg("train", base + [f"method/net={option}"] + NET_SHRINK[option], tmp_path)
    method = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert type(method.net).__name__ == cfg.method.net._target_.rsplit(".", 1)[1]
    if option == "tnrd":
        assert (method.net.channels, method.inject, method.net_gradient_form) == (cfg.data.channels, "none", True)
        assert method.net.sign_weight[0].item() == pytest.approx(cfg.method.tv_weight)  # starts as TV's weight
    else:
        assert (method.net.in_channels, method.net.out_channels) == (2 * cfg.data.channels, cfg.data.channels)
        assert method.inject == "anchor"
    assert train(cfg)["test"]["model"]["psnr"] > 10


def test_a_build_error_names_the_specialization_that_set_the_groups_keys(tmp_path):
    """method/net=tnrd on deblurring: degrad_deblur.yaml's method.net.gamma (a conv net's scale) reaches TNRD, which
    has none; the error names the specialization and how to drop its keys."""
    from jfb_ip.lit.checks import instantiate_group
    from jfb_ip.lit.errors import ConfigError

    cfg = compose_cfg("train", ["method/net=tnrd"], tmp_path)
    with pytest.raises(ConfigError, match=r"'gamma'.*conf/method_task/degrad_deblur.yaml sets method keys too.*"
                                          r"'~method.<key>'.*'~method_task'"):
        instantiate_group(cfg, "method", _convert_="all")
    for fix in ("~method.net.gamma", "~method_task"):
        cfg = compose_cfg("train", ["method/net=tnrd", fix], tmp_path)
        assert type(instantiate_group(cfg, "method", _convert_="all").net).__name__ == "TNRD"
    # any group the specialization sets (pnp_admm_inpaint.yaml: task.init), and only those
    cfg = compose_cfg("train", ["method=pnp_admm", "task=inpaint", "task.init=bogus"], tmp_path)
    with pytest.raises(ConfigError, match=r"conf/method_task/pnp_admm_inpaint.yaml sets task keys too"):
        instantiate_group(cfg, "task")
    cfg = compose_cfg("train", ["task=inpaint", "task.init=bogus"], tmp_path)
    with pytest.raises(ConfigError) as e:
        instantiate_group(cfg, "task")
    assert "method_task" not in str(e.value)


@pytest.mark.parametrize("option", options("experiment"))
def test_experiments_compose_and_build(option, tmp_path):
    cfg = compose_cfg("train", [f"experiment={option}"], tmp_path)
    method = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert method.backward_mode == cfg.backward.mode
    if option in ("de_grad_jfb", "deq_implicit", "liu_celeba"):  # Liu et al.'s [1] map, whatever the defaults are
        assert (method.data_step, method.inject, method.initializer, method.reg_relative) == (
            "gradient", "none", "task", False)
        assert method.net.in_channels == cfg.data.channels and method.wiener is None


# options that need an optional extra's Hydra plugin (tests/test_sweeps.py builds and runs them when installed)
NEEDS_PLUGIN = {("hparams_search", "optuna"): "hydra_plugins.hydra_optuna_sweeper",
                ("launcher", "slurm"): "hydra_plugins.hydra_submitit_launcher",
                ("launcher", "submitit_local"): "hydra_plugins.hydra_submitit_launcher"}


@pytest.mark.parametrize("group", ["hparams_search", "launcher", "debug"])
def test_other_groups_compose(group, tmp_path):
    import importlib.util

    def installed(name: str) -> bool:
        try:  # find_spec of a submodule imports its parent, which raises when hydra_plugins itself is absent
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    for option in options(group):
        plugin = NEEDS_PLUGIN.get((group, option))
        if plugin and not installed(plugin):
            with pytest.raises(ConfigCompositionException):  # absent plugin: composing fails, naming the option
                compose_cfg("train", [f"{group}={option}"], tmp_path)
            continue
        compose_cfg("train", [f"{group}={option}"], tmp_path)


def test_unknown_keys_fail(tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["method.not_a_key=1"], tmp_path)
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", ["task=not_a_task"], tmp_path)


@pytest.mark.parametrize("combo", [["method=degrad", "task=deblur"], ["method=degrad", "task=deblur_5x5"],
                                   ["debug=fast_dev_run"]])
def test_train_runs(combo, tmp_path):
    cfg = compose_cfg("train", TINY + combo, tmp_path)
    out = train(cfg)
    assert {"measurement", "wiener", "model"} <= set(out["test"])
    if "debug=fast_dev_run" not in combo:
        assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        assert metrics["test"]["model"]["psnr"] > 10


SHRINK = {"lu_dncnn": ["method.net.depth=3", "method.net.width=8", "method.stages=2"],
          "luser_sw": ["solver.max_iter=3", "method.stages=2"],
          "luser_dw": ["solver.max_iter=3", "method.stages=2"],
          "deprox": ["method.net.depth=3", "method.net.width=8", "solver.max_iter=5"],
          "degrad": ["method.net.depth=3", "method.net.width=8", "solver.max_iter=5"],
          "wiener": [],
          "denoiser": ["method.net.features=[8,16]", "method.net.blocks=1"],
          "pnp_admm": ["method.n_iter=2", "method.lambda_grid=[0.23]"],
          "tv": ["method.max_iter=20", "method.lambda_grid=[1e-3,1e-2]"],
          "mtdeq": ["method.net.features=[8,16]", "method.net.blocks=1", "solver.max_iter=5"]}
# methods whose config picks its own task (the tiny deblur keys do not apply)
PICKS_TASK = {"denoiser"}


def method_overrides(base: list[str], option: str, request) -> list[str]:
    """``base`` with the tiny net/solver keys of DE-GRAD swapped for the method's own (and a denoiser checkpoint
    for the methods that load one)."""
    drop = ("method.", "solver.", "task.") if option in PICKS_TASK else ("method.", "solver.")
    out = [o for o in base if not o.startswith(drop)] + SHRINK[option]
    if option == "pnp_admm":
        out.append(f"method.denoiser.path={request.getfixturevalue('denoiser_ckpt')}")
    return out


@pytest.mark.parametrize("group,option", [(g, o) for g in ("method", "task", "solver", "backward", "trainer",
                                                             "logger", "callbacks", "data") for o in options(g)
                                          if (g, o) not in (("trainer", "gpu"),
                                                            # in-process, DDP would re-run pytest: tests/test_ddp.py
                                                            # runs trainer=ddp_sim in real processes
                                                            ("trainer", "ddp"), ("trainer", "ddp_sim"))])
def test_fast_dev_run_for_every_option(group, option, tmp_path, image_folder, fake_celeba, monkeypatch, request):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    base = TINY_ANY_DATA if group == "data" else TINY
    if group == "method":
        base = method_overrides(base, option, request)
    if group == "task":
        base = for_task(base, option)
    extra = {"folder": [f"data.root={image_folder}", "data.num_workers=0"],
             "celeba": [f"data.root={fake_celeba}", "data.num_workers=0"]}.get(option, []) if group == "data" else []
    cfg = compose_cfg("train", base + [f"{group}={option}", "+trainer.fast_dev_run=true"] + extra, tmp_path)
    out = train(cfg)
    # fast_dev_run: one batch of each split, so exactly eval_batch_size (4) test images, all finite
    test = out["test"]
    assert test["n_images"] == min(4, 3 if option == "folder" else 2 if option == "celeba" else 4)
    assert all(math.isfinite(v) for v in test["per_image"]["model"]["psnr"])


def test_backward_option_of_another_mode_fails_when_built(tmp_path):
    cfg = compose_cfg("train", ["backward=neumann", "+backward.unroll_steps=3"], tmp_path)
    with pytest.raises(Exception, match=r"takes no option\(s\) \['unroll_steps'\]"):
        hydra.utils.instantiate(cfg.method, _convert_="all")


def test_solver_and_backward_come_with_the_fixed_point_methods_only(tmp_path):
    """The fixed-point methods pick a forward solver and a backward mode, which the command line replaces and
    extends as top-level groups; a method without a fixed point composes neither, and one given to it is refused."""
    from jfb_ip.lit.checks import check_run_config
    from jfb_ip.lit.errors import ConfigError

    cfg = compose_cfg("train", ["solver=broyden", "solver.memory=20"], tmp_path)
    method = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert (method.solve.forward, cfg.method.solver.memory, method.backward_mode) == ("broyden", 20, "jfb")
    cfg = compose_cfg("train", ["backward=implicit", "backward.backward_solver=cg"], tmp_path)
    assert cfg.method.backward == {"mode": "implicit", "backward_solver": "cg", "backward_tol": None,
                                   "backward_max_iter": None}
    for mode in ("jfb", "implicit", "neumann"):  # the sweep -m method=degrad backward=jfb,implicit,neumann
        cfg = compose_cfg("train", ["method=degrad", f"backward={mode}"], tmp_path)
        assert hydra.utils.instantiate(cfg.method, _convert_="all").backward_mode == mode
    assert compose_cfg("train", ["method=mtdeq"], tmp_path).method.solver.name == "fixed_point"
    assert compose_cfg("train", ["method=lu_dncnn"], tmp_path).backward.mode == "unroll"
    for name in ("tv", "wiener", "pnp_admm", "denoiser", "lu_dncnn"):
        cfg = compose_cfg("train", [f"method={name}"], tmp_path)
        assert cfg.get("solver") is None and "solver" not in cfg.method
        if name != "lu_dncnn":
            assert cfg.get("backward") is None and "backward" not in cfg.method
        given = compose_cfg("train", [f"method={name}", "solver=anderson"], tmp_path)
        with pytest.raises(ConfigError, match=f"method={name} has no fixed point to solve, so solver=anderson"):
            check_run_config(given)
    with pytest.raises(ConfigError, match="method=tv has no backward mode to choose, so backward=implicit"):
        check_run_config(compose_cfg("train", ["method=tv", "backward=implicit"], tmp_path))
    assert not (Path(CONF) / "solver" / "none.yaml").exists() and not (Path(CONF) / "backward" / "none.yaml").exists()


@pytest.mark.parametrize("task,size", [("ct", 362), ("mri4x", 320), ("mri8x", 320)])
def test_luser_experiments_set_the_papers_sizes(task, size, tmp_path):
    """Guan et al. [3] §4: LoDoPaB-CT 362x362 with 200 of 1000 angles and the adjoint initializer;
    fastMRI single-coil knee 320x320 at 4x / 8x; DEQ4IP = DE-Prox with a 17x64 BN + SN DnCNN."""
    cfg = compose_cfg("train", [f"experiment=[luser_{task},deq4ip]"], tmp_path)
    assert (cfg.data.image_size, cfg.data.channels, cfg.trainer.accelerator) == (size, 1, "gpu")
    assert cfg.data.dataset._target_ == "jfb_ip.data.ImageFolder"
    if task == "ct":
        assert (cfg.task.n_angles, cfg.task.init_mode) == (200, "adjoint")
    else:
        assert cfg.task.acceleration == int(task[3])
    net = cfg.method.net
    assert (cfg.method._target_, net.depth, net.width, net.batch_norm, net.spectral_norm, cfg.backward.mode) == \
        ("jfb_ip.methods.DEProx", 17, 64, True, True, "implicit")


def test_luser_ct_with_deq4ip_trains_on_a_folder_when_shrunk(tmp_path, image_folder):
    """The full-size experiment's wiring (folder data, adjoint-initialised CT, DEQ4IP with BatchNorm inside
    the equilibrium) runs end to end on CPU once its sizes are overridden down."""
    cfg = compose_cfg("train", [f"experiment=[luser_ct,deq4ip]", f"data.root={image_folder}", "debug=smoke",
                                "trainer.max_steps=2", "logger=none", "data.image_size=16", "data.num_workers=0",
                                "method.net.depth=3",
                                "method.net.width=8", "task.n_angles=12", "solver.max_iter=5"], tmp_path)
    out = train(cfg)
    assert out["config"]["task"]["n_angles"] == 12 and math.isfinite(out["test"]["model"]["psnr"])


def test_method_task_specializations_apply_to_their_pair_only(tmp_path):
    """conf/method_task/<method>_<task>.yaml (Hydra's specializing configuration) sets its keys for that pair and
    nothing else: every file names an existing method and task, composing the pair yields the file's values,
    every other pair keeps the defaults, and the command line and paper-000 experiments still win."""
    import yaml
    from omegaconf import OmegaConf

    def flat(d, prefix=""):  # {"a": {"b": 1}} -> {"a.b": 1}
        return {k: v for key, val in d.items()
                for k, v in (flat(val, f"{prefix}{key}.") if isinstance(val, dict) else {f"{prefix}{key}": val}).items()}

    specs = options("method_task")
    assert {"degrad_mri4x", "degrad_deblur"} <= set(specs)
    specialised = {}
    for spec in specs:
        pairs = [(m, t) for m in options("method") for t in options("task") if f"{m}_{t}" == spec]
        assert len(pairs) == 1, f"conf/method_task/{spec}.yaml names no <method>_<task> pair"
        values = flat(yaml.safe_load((Path(CONF) / "method_task" / f"{spec}.yaml").read_text()))
        cfg = compose_cfg("train", [f"method={pairs[0][0]}", f"task={pairs[0][1]}"], tmp_path)
        assert {k: OmegaConf.select(cfg, k) for k in values} == values, spec
        specialised[pairs[0]] = values
    # a key set for one pair keeps the group's own default everywhere else (DE-GRAD on every task, tested method x
    # deblur pairs), read from a composition that cannot pick up any method_task file
    for method, task in [("degrad", t) for t in options("task")] + [(m, "deblur") for m in ("deprox", "luser_sw")]:
        cfg = compose_cfg("train", [f"method={method}", f"task={task}"], tmp_path)
        base = compose_cfg("train", [f"method={method}", f"task={task}", "~method_task"], tmp_path)
        own = specialised.get((method, task), {})
        for key in {k for values in specialised.values() for k in values} - set(own):
            assert OmegaConf.select(cfg, key) == OmegaConf.select(base, key), (method, task, key)
    assert compose_cfg("train", ["task=mri4x", "method.contraction_penalty=0"], tmp_path).method.contraction_penalty == 0
    cli = compose_cfg("train", ["trainer.max_steps=5", "solver.train_tol=null", "module.loss._target_=torch.nn.MSELoss"],
                      tmp_path)
    assert (cli.trainer.max_steps, cli.solver.train_tol, cli.module.loss._target_) == (5, None, "torch.nn.MSELoss")
    for exp in ("de_grad_jfb", "deq_implicit"):  # Liu et al.'s [1] map, loss and solves, whatever the task
        cfg = compose_cfg("train", ["task=mri4x", f"experiment={exp}"], tmp_path)
        assert cfg.method.contraction_penalty == 0
        cfg = compose_cfg("train", [f"experiment={exp}"], tmp_path)
        assert (cfg.module.loss._target_, cfg.method.solver.train_tol) == ("torch.nn.MSELoss", None)
        assert cfg.specialization is None
    # the specialisation a run picked up is in its config (`python train.py --cfg job` shows it)
    assert compose_cfg("train", [], tmp_path).specialization == "degrad_deblur"
    assert compose_cfg("train", ["task=mri4x"], tmp_path).specialization == "degrad_mri4x"
    assert compose_cfg("train", ["method=deprox"], tmp_path).specialization is None
