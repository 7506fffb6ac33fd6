"""What train.py and evaluate.py do, as functions of a composed Hydra config."""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import config_dir
from ..checkpoint import StateMismatch, UnreadableCheckpoint, load_state, read_weights_only
from ..data import DatasetError
from .checkpointing import AtomicCheckpointIO
from .module import ReconstructionModule, TrainingDiverged
from .speed import apply_speed_switches

log = logging.getLogger(__name__)


# what evaluate.py runs without a checkpoint (methods with nothing to train)
UNTRAINED_METHODS = ("method=wiener", "method=tv", "method=pnp_admm")


class ConfigError(ValueError):
    """A config that cannot work; the message says what to change."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, foreign, of another method)."""


def _instantiate_dict(cfg: DictConfig | None) -> list:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def instantiate_group(cfg: DictConfig, group: str, **kwargs):
    """Build one config group; an error names the group and its cause in one line (ConfigError)."""
    try:
        return hydra.utils.instantiate(cfg[group], **kwargs)
    except InstantiationException as e:
        cause = _cause(e)
        given = [o for o in _overrides() if o.lstrip("+~").startswith((f"{group}.", f"{group}="))]
        hint = f"you set {', '.join(given)}" if given else f"check the {group}.* values"
        raise ConfigError(f"could not build `{group}` ({cfg[group].get('_target_', '?')}): "
                          f"{cause if cause is not e else str(e).strip().splitlines()[-1]} ({hint})") from None


def _overrides() -> list[str]:
    """The command-line overrides of this run (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def build_module(cfg: DictConfig, run_config: dict | None = None) -> ReconstructionModule:
    method = instantiate_group(cfg, "method", _convert_="all")
    task = instantiate_group(cfg, "task")
    module = instantiate_group(cfg, "module", method=method, task=task) if cfg.get("module") else \
        ReconstructionModule(method, task)
    # set after instantiation: the config holds _target_ keys that instantiate must not build
    module.hparams["run_config"] = run_config
    return module


def format_table(results: dict[str, Any]) -> str:
    rows = [k for k in ("measurement", "wiener", "model") if k in results]
    fmt = lambda v, spec: "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)  # noqa: E731
    lines = [f"{'test (' + str(results.get('n_images', '?')) + ' images)':<24}{'PSNR [dB]':>10}{'SSIM':>8}"]
    lines += [f"{r:<24}{fmt(results[r]['psnr'], '.2f'):>10}{fmt(results[r]['ssim'], '.4f'):>8}" for r in rows]
    return "\n".join(lines)


def json_safe(obj: Any) -> tuple[Any, bool]:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN/inf), and whether any was."""
    found = False

    def walk(o):
        nonlocal found
        if isinstance(o, float) and not math.isfinite(o):
            found = True
            return None
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj), found


def write_metrics(out_dir: Path, payload: dict[str, Any]) -> Path:
    """``metrics.json``, always valid JSON: non-finite numbers become null and set ``"non_finite": true``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    safe, found = json_safe(payload)
    if found:
        safe["non_finite"] = True
        log.warning("metrics.json: some values were not finite (written as null)")
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(safe, indent=2, allow_nan=False))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by train.py, unpickled with ``weights_only=True`` (a checkpoint file can
    never run code), with its plain-data run config. Every way it can be unusable is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path} does not exist (a run writes <run dir>/checkpoints/last.ckpt)")
    try:
        ckpt = read_weights_only(path)
    except UnreadableCheckpoint as e:
        raise CheckpointError(f"ckpt_path={path} is not a readable jfb-ip checkpoint (truncated, corrupt, or holding "
                              f"objects other than tensors and plain data: {e}); use a last.ckpt or "
                              f"best-step*.ckpt written by train.py") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt_path={path} holds no model state_dict; is it a Lightning checkpoint from train.py?")
    run_config = (ckpt.get("hyper_parameters") or {}).get("run_config")
    if not isinstance(run_config, dict) or "method" not in run_config:
        raise CheckpointError(f"ckpt_path={path} holds no jfb-ip run config; was it written by train.py?")
    return ckpt


def load_weights(module: ReconstructionModule, ckpt: dict[str, Any], path) -> None:
    """Load the state dict, naming the mismatch instead of printing torch's key lists."""
    module.on_load_checkpoint(ckpt)
    name = (ckpt["hyper_parameters"]["run_config"].get("method") or {}).get("_target_", "?")
    try:
        load_state(module, ckpt["state_dict"])
    except StateMismatch as e:
        raise CheckpointError(f"ckpt_path={path} does not match the method it names ({name}): {e}; "
                              f"was the checkpoint edited or written by another version?") from None


def _trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    trainer = instantiate_group(cfg, "trainer", callbacks=callbacks, logger=loggers or False,
                                plugins=[AtomicCheckpointIO()])
    check_launch(trainer, _hydra_mode_and_direction()[0])
    return trainer


def check_launch(trainer: L.Trainer, multirun: bool) -> None:
    """Refuse the process launches that cannot work here, before any process starts.

    Lightning's ``ddp`` starts the other processes by re-running this command line (``_SubprocessScriptLauncher``),
    ``-m`` included: in a Hydra multirun every child would run the whole sweep. Where the processes already exist
    (one SLURM task per GPU, torchrun) Lightning launches nothing and a multirun is fine. ``ddp_spawn``/``ddp_fork``
    run fit and test in child processes whose module (the test table, examples) never comes back to this one."""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        raise ConfigError(f"trainer.strategy=ddp_{launcher._start_method} (Lightning's multiprocessing launcher) runs "
                          f"fit and test in child processes whose results never reach metrics.json; use trainer=ddp")
    relaunches = isinstance(launcher, _SubprocessScriptLauncher) and \
        not trainer.strategy.cluster_environment.creates_processes_externally
    if multirun and relaunches:
        raise ConfigError(f"a multirun (-m) with DDP on {trainer.num_devices} devices: Lightning would re-run the "
                          f"command, -m included, once per device and every copy would run the whole sweep. Use "
                          f"launcher=slurm (one task per GPU), or start the processes with torchrun (torchrun --standalone "
                          f"--nproc_per_node=N train.py -m hydra.sweep.dir=<dir> ...), or drop -m and run one command "
                          f"per job")


def check_weight_averaging(callbacks: list, module: torch.nn.Module) -> None:
    """Refuse Lightning's weight averaging (``WeightAveraging``, ``EMAWeightAveraging``) with ``use_buffers=True``
    (its default) on a model with normalised convolutions. It then averages every buffer, the power-iteration
    vectors of spectral or operator-norm normalisation among them; those rotate as the weights train, so their
    average is shorter than a unit vector, each conv's norm is underestimated and the normalised weights too large.
    Measured on the deblurring default: averaged vectors of norm 0.53-0.69, validation 5.7 dB, Lip(T) 48000 (README,
    "What moves the default model's number"). With ``use_buffers=false`` torch's AveragedModel averages the
    parameters alone and keeps the buffers in sync with the live model, which is fine."""
    from lightning.pytorch.callbacks import WeightAveraging

    state = [name for name, _ in module.named_buffers() if ".parametrizations." in f".{name}"]
    if not state:
        return
    for cb in callbacks:
        # _use_buffers: the callback's own record of its use_buffers argument (Lightning 2.6); absent: assume the default
        if isinstance(cb, WeightAveraging) and getattr(cb, "_use_buffers", True):
            raise ConfigError(f"callbacks: {type(cb).__name__} with use_buffers=true would average the power-iteration "
                              f"vectors of the network's normalised convolutions ({state[0]}, ...) and the averaged "
                              f"model's convs would be too large; pass use_buffers=false (e.g. "
                              f"+callbacks.<name>.use_buffers=false), which averages the weights alone")


def check_run_config(cfg: DictConfig) -> None:
    """Config errors that no single group can see, raised before anything runs."""
    grid = cfg.get("grid_images")
    if grid is not None and (not isinstance(grid, int) or grid < 1):
        raise ConfigError(f"grid_images must be an integer >= 1, got {grid!r}")
    if cfg.get("task") and cfg.get("data"):
        check_task_data(cfg)
    if (cfg.get("trainer") or {}).get("gradient_clip_val") is not None:
        raise ConfigError(f"trainer.gradient_clip_val={cfg.trainer.gradient_clip_val} is not available (training uses "
                          f"Lightning's manual optimization so that a batch whose every sample diverged takes no "
                          f"step): set module.gradient_clip_val={cfg.trainer.gradient_clip_val} instead")
    metric = cfg.get("optimized_metric")
    if metric is not None and not (isinstance(metric, str) and metric.startswith("val/")):
        raise ConfigError(f"optimized_metric must name a validation metric such as val/psnr or val/ssim, got {metric!r}")


def check_fresh_run_dir(out_dir: Path) -> None:
    """Resuming is an explicit choice (``ckpt_path=``), never a surprise. Lightning, given an on-exception callback
    and no ``ckpt_path``, would resume the newest checkpoint it finds in the run directory; a new run there could also
    overwrite an earlier run's checkpoints. A run directory that already holds checkpoints is refused."""
    found = sorted(p.name for p in (out_dir / "checkpoints").glob("*.ckpt"))
    if found:
        resume = out_dir / "checkpoints" / ("last.ckpt" if "last.ckpt" in found else found[-1])
        raise ConfigError(f"the run directory {out_dir} already holds checkpoints of an earlier run ({', '.join(found)}):"
                          f" resume it with ckpt_path={resume}, or start a new run in another directory (the default "
                          f"hydra.run.dir is new for every run)")


def check_task_data(cfg: DictConfig) -> None:
    """``cfg.task``'s needs against ``cfg.data`` (channels, a size the operator accepts), as one
    ConfigError naming the fix (``Task.check_data``), before any data is read or model built."""
    task = instantiate_group(cfg, "task")
    try:
        task.check_data(int(cfg.data.channels), int(cfg.data.image_size))
    except ValueError as e:
        raise ConfigError(f"task={_choice('task') or task.name} {e}") from None


def _choice(group: str) -> str | None:
    """The option picked for a config group in this run (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        return None


def _examples_png(module: ReconstructionModule, out_dir: Path, n: int) -> Path | None:
    if module.test_examples is None:
        return None
    import torchvision

    x, y, xh = module.test_examples
    if x.shape[0] < n:
        log.warning("examples.png shows %d images: the test split has only %d (grid_images=%d)", x.shape[0],
                    x.shape[0], n)
    path = out_dir / "examples.png"
    torchvision.utils.save_image(torch.cat([x, y, xh]).float(), path, nrow=x.shape[0], padding=2)
    return path


def keep_hydra_record(out_dir: Path) -> None:
    """With ``paths.output_dir=<dir>`` the run's outputs leave Hydra's run directory, where Hydra wrote ``.hydra/``
    (the composed config, its overrides and choices): copy that record beside them, so ``jfb_ip.report`` and a
    reader of ``<dir>`` know what was run. Nothing to do outside a Hydra app or when the two are the same."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    record = Path(hc.runtime.output_dir) / (hc.output_subdir or ".hydra")
    if record.is_dir() and out_dir.resolve() != record.parent.resolve():
        shutil.copytree(record, out_dir / ".hydra", dirs_exist_ok=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, save ``<run dir>/checkpoints/last.ckpt``, test, write ``metrics.json`` and ``examples.png``."""
    t0 = time.perf_counter()
    check_run_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("ckpt_path"):
        load_checkpoint(cfg.ckpt_path)  # readable and safe before Lightning touches it
    elif cfg.get("train", True):
        check_fresh_run_dir(out_dir)
    keep_hydra_record(out_dir)
    datamodule = instantiate_group(cfg, "data")
    datamodule.validate("fit" if cfg.get("train", True) else "test")  # a missing split fails now, not after training
    module = build_module(cfg, run_config)
    apply_speed_switches(module, cfg.get("channels_last", False), cfg.get("compile", False))
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    check_weight_averaging(callbacks, module)
    trainer = _trainer(cfg, callbacks, _instantiate_dict(cfg.get("logger")))
    log_run_config(trainer.loggers, run_config)
    fit_s = 0.0
    last = out_dir / "checkpoints" / "last.ckpt"
    if cfg.get("train", True) and not module.trainable:
        log.info("%s has nothing to train: tuning on the validation split only", type(module.method).__name__)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    elif cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        fit_s = time.perf_counter() - t0
        if trainer.interrupted:
            log.warning("training was interrupted; resume with ckpt_path=%s", last)
        elif not bool(module.wiener.tuned) and not trainer.fast_dev_run:
            # no validation epoch ran (short run): validate once so the Wiener baseline is tuned
            # on validation data, never on the test set
            trainer.validate(module, datamodule=datamodule, verbose=False)
        if not trainer.fast_dev_run:
            trainer.save_checkpoint(last, weights_only=False)  # the full training state, to resume from
    payload: dict[str, Any] = {"config": {k: v for k, v in run_config.items()
                                          if k in ("method", "task", "solver", "backward", "data", "seed")}}
    # the last validation epoch's values (the weights of last.ckpt): what `optimized_metric` picks for a sweeper
    payload["val"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.get("test", True):
        module.n_examples = cfg.grid_images
        trainer.test(module, datamodule=datamodule, verbose=False)
        payload["test"] = module.test_results
        if trainer.is_global_zero:  # under DDP every process holds the table of all shards; one writes it
            _examples_png(module, out_dir, cfg.grid_images)
            print("\n" + format_table(module.test_results) + "\n")
    payload["train"] = {"wall_time_s": fit_s, "steps": trainer.global_step, "skipped_samples": module.skipped_samples,
                        **module.train_summary()}
    payload["wall_time_s"] = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return payload
    path = write_metrics(out_dir, payload)
    log.info("metrics written to %s", path)
    if "test" in payload:
        log_test_results(trainer.loggers, payload["test"], out_dir / "examples.png")
    finish_wandb(exit_code=0)
    return payload


def log_run_config(loggers: list, run_config: dict[str, Any]) -> None:
    """The full resolved run config and the Hydra choices (``choices.method``, ``choices.backward``, ...) to every
    logger. Lightning logs only the module's own hyperparameters, where the run config is not yet set."""
    from hydra.core.hydra_config import HydraConfig

    try:
        choices = {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra/")}
    except ValueError:
        choices = {}
    for lg in loggers:
        lg.log_hyperparams({**run_config, "choices": choices})


def log_test_results(loggers: list, results: dict[str, Any], examples: Path) -> None:
    """The test table to wandb: each row's PSNR/SSIM in the run summary (``test/model_psnr``: dashboards compare
    runs by it), the same rows as a ``test/table`` Table, and ``examples.png`` as the ``test/examples`` image."""
    rows = [r for r in ("measurement", "wiener", "model") if r in results]
    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        for row in rows:
            for k in ("psnr", "ssim"):
                lg.experiment.summary[f"test/{row}_{k}"] = results[row][k]
        lg.log_table(key="test/table", columns=["row", "psnr", "ssim"],
                     data=[[r, results[r]["psnr"], results[r]["ssim"]] for r in rows])
        if examples.is_file():
            lg.log_image(key="test/examples", images=[str(examples)],
                         caption=["rows: truth / measurement / reconstruction"])


def optimized_value(payload: dict[str, Any], metric: str | None) -> float | None:
    """The value a Hydra sweeper optimises: ``payload["val"][metric]`` of a finished run (``optimized_metric``,
    e.g. ``val/psnr``, the last validation epoch's value), None when no metric is named."""
    if not metric:
        return None
    if metric not in payload.get("val", {}):
        raise ConfigError(f"optimized_metric={metric} was not logged by this run; logged: "
                          f"{', '.join(sorted(payload.get('val', {}))) or 'nothing (no validation ran)'}")
    return payload["val"][metric]


def train_objective(cfg: DictConfig) -> float | None:
    """:func:`train`, returning ``cfg.optimized_metric``'s value for a sweeper (lightning-hydra-template's
    ``train.py`` returns its ``optimized_metric`` the same way)."""
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the model of a checkpoint, test it on the seeded test split, write
    ``metrics.json`` and ``examples.png`` (rows: truth / measurement / reconstruction).
    Without ``ckpt_path``: :func:`evaluate_without_checkpoint`."""
    if not cfg.get("ckpt_path"):
        return evaluate_without_checkpoint(cfg)
    given = [g for g in ("method", "task", "backward") if cfg.get(g) is not None]
    if given:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} brings its own {', '.join(given)}: drop the "
                          f"{' / '.join(g + '=' for g in given)} override(s) (data= and solver= may change)")
    check_run_config(cfg)
    path = Path(cfg.ckpt_path)
    ckpt = load_checkpoint(path)
    train_cfg = OmegaConf.create(ckpt["hyper_parameters"]["run_config"])
    if cfg.get("solver") is not None:
        train_cfg = with_forward_solver(train_cfg, cfg.solver, path)
    L.seed_everything(cfg.seed, workers=True)
    # resolved here: interpolations such as data.seed=${seed} point outside the data group
    data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data if cfg.get("data") else train_cfg.data, resolve=True))
    if int(data_cfg.channels) != int(train_cfg.data.channels):
        raise ConfigError(f"the checkpoint's model takes data.channels={train_cfg.data.channels} but "
                          f"data.channels={data_cfg.channels} was given; drop the override or set "
                          f"data.channels={train_cfg.data.channels}")
    check_task_data(OmegaConf.create({"task": train_cfg.task, "data": data_cfg}))
    datamodule = instantiate_group(OmegaConf.create({"data": data_cfg}), "data")
    datamodule.validate("test")
    module = build_module(OmegaConf.create({"method": train_cfg.method, "task": train_cfg.task,
                                            "module": train_cfg.get("module")}), ckpt["hyper_parameters"]["run_config"])
    load_weights(module, ckpt, path)
    apply_speed_switches(module, cfg.get("channels_last", False), cfg.get("compile", False))
    trainer = _trainer(cfg, [], _instantiate_dict(cfg.get("logger")))
    payload = {"ckpt_path": str(path), "data": OmegaConf.to_container(data_cfg, resolve=True)}
    if cfg.get("solver") is not None:
        payload["solver"] = OmegaConf.to_container(cfg.solver, resolve=True)
    return _test_and_write(cfg, trainer, module, datamodule, payload)


def with_forward_solver(run_cfg: DictConfig, solver: DictConfig, path: Path) -> DictConfig:
    """A checkpoint's run config with its forward solver replaced by ``solver`` (``evaluate.py ckpt_path=...
    solver=anderson solver.max_iter=200``: does a capped solve converge with more iterations?). The weights do not
    depend on the solver; the run config stores ``method.solver`` (``${solver}`` at training) resolved, so every
    ``solver`` node under ``method`` equal to the run's top-level one is swapped."""
    old = run_cfg.get("solver")
    if old is None or old.get("name") == "none":
        raise ConfigError(f"the checkpoint {path} holds a method without a forward solve "
                          f"({run_cfg.method.get('_target_', '?')}): drop solver=")

    def swap(node: DictConfig) -> int:
        n = 0
        for key in list(node.keys()):
            if key == "solver" and node[key] == old:
                node[key], n = solver, n + 1
            elif isinstance(node[key], DictConfig):
                n += swap(node[key])
        return n

    if not swap(run_cfg.method):
        raise ConfigError(f"the checkpoint {path}: no method.solver matches its run's solver, so solver= has nothing "
                          f"to replace; drop solver=")
    run_cfg.solver = solver
    return run_cfg


def _test_and_write(cfg: DictConfig, trainer: L.Trainer, module: ReconstructionModule, datamodule,
                    payload: dict[str, Any]) -> dict[str, Any]:
    """Test on the seeded test split; ``metrics.json`` (``payload`` + ``"test"``), ``examples.png``, the table."""
    module.n_examples = cfg.grid_images
    trainer.test(module, datamodule=datamodule, verbose=False)
    payload["test"] = module.test_results
    out_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:  # under DDP every process holds the table of all shards; one writes it
        write_metrics(out_dir, payload)
        _examples_png(module, out_dir, cfg.grid_images)
        print("\n" + format_table(module.test_results) + "\n")
    return payload


def train_default(group: str) -> str:
    """The option conf/train.yaml's defaults list picks for ``group`` (evaluate.py's default data is train.py's)."""
    for item in OmegaConf.load(config_dir() / "train.yaml").defaults:
        if isinstance(item, DictConfig) and group in item:
            return item[group]
    raise KeyError(f"conf/train.yaml has no default for {group}")


def evaluate_without_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """``evaluate.py method=<m> task=<t> [data=...]`` for a method with nothing to train (Wiener, TV, PnP-ADMM:
    :class:`~jfb_ip.methods.CalibratedMethod`): choose its lambda (and the Wiener row's) on the validation split,
    then test on the seeded test split, with the measurements ``train.py`` would make (same ``seed``).

    Data: the ``data`` group if given, else the task's pick (CT/MRI: phantoms), else train.py's default (natural). A data set
    without a validation split (``data=folder`` with no ``<root>/val``) is refused with the fix, since the search
    never looks at test images, unless ``method.lambda_grid=[]`` (``method.lam`` as given; the Wiener row then
    keeps its default weight, with a warning)."""
    from ..methods import CalibratedMethod

    if not cfg.get("method"):
        raise ConfigError(f"evaluate.py needs ckpt_path=<run dir>/checkpoints/last.ckpt, or method=<m> task=<t> for "
                          f"a method with nothing to train ({', '.join(UNTRAINED_METHODS)})")
    name = _choice("method") or cfg.method.get("_target_", "?")
    if not issubclass(hydra.utils.get_class(cfg.method._target_), CalibratedMethod):
        raise ConfigError(f"method={name} is learned: evaluate it from a checkpoint, ckpt_path=<run dir>/checkpoints/"
                          f"last.ckpt (python train.py method={name} writes one); without ckpt_path only methods with "
                          f"nothing to train run ({', '.join(UNTRAINED_METHODS)})")
    if not cfg.get("task"):
        raise ConfigError(f"evaluate.py method={name} needs a task: add task=<task> (e.g. task=deblur)")
    if not cfg.get("data"):
        with open_dict(cfg):
            cfg.data = OmegaConf.load(config_dir() / "data" / f"{train_default('data')}.yaml")
    check_run_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    datamodule = instantiate_group(cfg, "data")
    datamodule.validate("test")
    module = build_module(OmegaConf.create({"method": run_config["method"], "task": run_config["task"],
                                            "module": {"_target_": "jfb_ip.lit.ReconstructionModule",
                                                       "seed": cfg.seed}}), run_config)
    method = module.method
    try:
        datamodule.validate("validate")
        has_val = True
    except DatasetError as e:
        if method.lambda_grid:
            raise ConfigError(f"{e}; method={name} chooses its weight on the validation split, never on test: add "
                              f"a validation split (data=folder: <root>/val), or set method.lambda_grid=[] to use "
                              f"method.lam={float(method.lam):g} as given") from None
        log.warning("no validation split (%s): method=%s uses method.lam=%g as given, and the Wiener row its "
                    "default weight %g (not tuned)", e, name, float(method.lam), float(module.wiener.lam))
        has_val = False
    apply_speed_switches(module, cfg.get("channels_last", False), cfg.get("compile", False))
    trainer = _trainer(cfg, [], _instantiate_dict(cfg.get("logger")))
    if has_val:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    # no "val" block: the validation metrics were measured with the weights before the search ended
    payload = {"ckpt_path": None, "config": {k: run_config[k] for k in ("method", "task", "data", "seed")}}
    return _test_and_write(cfg, trainer, module, datamodule, payload)


def _cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (Hydra wraps errors raised while instantiating)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


class JobFailed(RuntimeError):
    """A multirun job stopped by an error a user can fix. It is logged and recorded in the job's ``metrics.json``
    (``"error"``), then raised as an ordinary exception rather than SystemExit: Hydra's launchers catch it per job, so
    the sweep's other jobs still run and the sweep exits with status 1 at the end."""


def _user_error(e: BaseException) -> str | None:
    """The one-line message of an error a user can fix (None for a bug, which keeps its traceback)."""
    if isinstance(e, (ConfigError, CheckpointError, DatasetError, TrainingDiverged)):
        return str(e)
    if isinstance(e, InstantiationException):
        cause = _cause(e)
        return str(cause) if cause is not e else str(e).strip().splitlines()[-1]
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"out of memory ({first[:200]}): lower data.batch_size or data.image_size, or pick a cheaper "
                f"backward= mode")
    return None


def _hydra_mode_and_direction() -> tuple[bool, str]:
    """(whether this job is part of a multirun, the sweeper's optimisation direction: 'maximize' unless set)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return False, "maximize"
    direction = hc.sweeper.get("direction", "maximize")  # Optuna's sweeper holds an enum (Direction.maximize)
    direction = str(getattr(direction, "name", direction)).lower()
    return hc.mode == RunMode.MULTIRUN, "minimize" if direction.endswith("minimize") else "maximize"


def finish_wandb(exit_code: int) -> None:
    """End this job's wandb run. Lightning's WandbLogger never calls ``wandb.finish()``, and a later
    WandbLogger in the same process (the next job of a multirun) would log into the still-open run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def main_guard(fn, cfg: DictConfig) -> Any:
    """Run ``fn(cfg)`` as a Hydra job: the errors a user can fix become one clear line instead of a traceback, and
    the job's wandb run is finished either way.

    In a multirun a failed job writes ``metrics.json`` with ``"error"`` and raises :class:`JobFailed` so the
    sweep goes on. In a search (``optimized_metric`` set, ``hparams_search=optuna``) a job that diverged or ran out
    of memory returns the worst value for the sweeper's direction (-inf when maximizing) instead: the study records
    the trial as bad and goes on (lightning-hydra-template returns the metric the same way)."""
    try:
        out = fn(cfg)
    except BaseException as e:
        finish_wandb(exit_code=1)
        message = _user_error(e)
        if message is None:
            raise
        log.error("%s", message)
        multirun, direction = _hydra_mode_and_direction()
        if not multirun:
            raise SystemExit(f"error: {message}") from None
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next job of this process needs the memory back
        payload: dict[str, Any] = {"error": message, "error_type": type(e).__name__}
        recoverable = isinstance(e, (TrainingDiverged, torch.OutOfMemoryError, MemoryError))
        if cfg.get("optimized_metric") and recoverable:
            payload["objective"] = float("-inf") if direction == "maximize" else float("inf")
            write_metrics(Path(cfg.paths.output_dir), payload)
            return payload["objective"]
        write_metrics(Path(cfg.paths.output_dir), payload)
        raise JobFailed(message) from None
    finish_wandb(exit_code=0)
    return out
