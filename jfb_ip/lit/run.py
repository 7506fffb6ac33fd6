"""The drivers: what train.py and evaluate.py do, as functions of a composed Hydra config."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import config_dir, tv_weight_path
from ..checkpoint import check_state_fits, load_checkpoint, load_weights
from ..data import DatasetError
from .callbacks import ReferenceRows, TestTable, TrainingStats
from .checkpointing import AtomicCheckpointIO, RngState
from .checks import (UNTRAINED_METHODS, check_fresh_run_dir, check_launch, check_run_config, check_task_data,
                     check_weight_averaging, choice, given, instantiate_group, train_default)
from .errors import ConfigError, finish_wandb, hydra_mode_and_direction
from .module import ReconstructionModule
from .outputs import (examples_png, format_table, keep_hydra_record, log_run_config, log_test_results, table_rows,
                      write_metrics)
from .speed import apply_speed_switches
from .validate import check_resume

log = logging.getLogger(__name__)

# the reference rows of a config without a `references` key
DEFAULT_REFERENCES = {"wiener": {"_target_": "jfb_ip.methods.Wiener", "prior": "gradient"}}


def _instantiate_dict(cfg: DictConfig | None) -> list:
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig, run_config: dict | None = None) -> ReconstructionModule:
    method = instantiate_group(cfg, "method", _convert_="all")
    task = instantiate_group(cfg, "task")
    module = instantiate_group(cfg, "module", method=method, task=task) if cfg.get("module") else \
        ReconstructionModule(method, task)
    # set after instantiation: the config holds _target_ keys that instantiate must not build
    module.hparams["run_config"] = run_config
    return module


class RunCallbacks:
    """The callbacks every run has, whatever the ``callbacks`` group holds: the reference rows (``references``),
    the test table, the training statistics and the RNG state of checkpoints."""

    def __init__(self, references: DictConfig | dict | None, grid_images: int):
        if isinstance(references, DictConfig):  # resolved where it sits: references.tv.lam is ${tv_weight}
            references = OmegaConf.to_container(references, resolve=True)
        refs = OmegaConf.create(DEFAULT_REFERENCES if references is None else references)
        self.references = ReferenceRows(instantiate_group(OmegaConf.create({"references": refs}), "references",
                                                          _convert_="all"))
        self.table = TestTable(self.references, n_examples=grid_images)
        self.stats = TrainingStats()

    def all(self) -> list:
        return [self.references, self.table, self.stats, RngState()]


def _trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    trainer = instantiate_group(cfg, "trainer", callbacks=callbacks, logger=loggers or False,
                                plugins=[AtomicCheckpointIO()])
    check_launch(trainer, hydra_mode_and_direction()[0])
    return trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, save ``<run dir>/checkpoints/last.ckpt``, test, write ``metrics.json`` and ``examples.png``."""
    t0 = time.perf_counter()
    check_tv_weight_task(cfg)
    check_run_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    ckpt = None
    if cfg.get("ckpt_path"):
        ckpt = load_checkpoint(cfg.ckpt_path)  # readable, finite and safe before Lightning touches it
        changed = check_resume(ckpt["hyper_parameters"]["run_config"], run_config, cfg.ckpt_path)
        if changed:
            log.warning("resuming with settings other than the checkpoint's run (it will not end where that run "
                        "would have): %s", "; ".join(changed))
    elif cfg.get("train", True):
        check_fresh_run_dir(out_dir)
    keep_hydra_record(out_dir)
    datamodule = instantiate_group(cfg, "data")
    datamodule.validate("fit" if cfg.get("train", True) else "test")  # a missing split fails now, not after training
    module = build_module(cfg, run_config)
    if ckpt is not None:
        check_state_fits(module, ckpt, cfg.ckpt_path)
    apply_speed_switches(module, cfg.get("channels_last", False), cfg.get("compile", False))
    run = RunCallbacks(cfg.get("references"), cfg.grid_images)
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    check_weight_averaging(callbacks, module)
    trainer = _trainer(cfg, run.all() + callbacks, _instantiate_dict(cfg.get("logger")))
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
        elif not run.references.tuned and not trainer.fast_dev_run:
            # no validation epoch ran (short run): validate once so the reference rows are tuned
            # on validation data, never on the test set
            trainer.validate(module, datamodule=datamodule, verbose=False)
        if not trainer.fast_dev_run:
            trainer.save_checkpoint(last, weights_only=False)  # the full training state, to resume from
    payload: dict[str, Any] = {"config": {k: v for k, v in run_config.items()
                                          if k in ("method", "task", "solver", "backward", "data", "seed")}}
    # the last validation epoch's values (the weights of last.ckpt): what `optimized_metric` picks for a sweeper
    payload["val"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.get("test", True):
        trainer.test(module, datamodule=datamodule, verbose=False)
        payload["test"] = run.table.results
        _warn_far_below(payload)
        if trainer.is_global_zero:  # under DDP every process holds the table of all shards; one writes it
            examples_png(run.table.examples, out_dir, cfg.grid_images)
            print("\n" + format_table(run.table.results) + "\n")
    payload["train"] = {"wall_time_s": fit_s, "steps": trainer.global_step, "skipped_samples": module.skipped_samples,
                        **run.stats.summary()}
    payload["wall_time_s"] = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return payload
    path = write_metrics(out_dir, payload)
    log.info("metrics written to %s", path)
    if "test" in payload:
        log_test_results(trainer.loggers, payload["test"], out_dir / "examples.png")
    finish_wandb(exit_code=0)
    return payload


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
    # the reference rows the checkpoint's run tuned, with the weights it chose
    references, tv_weight = train_cfg.get("references"), cfg.get("tv_weight")
    if tv_weight is not None:  # tv_weight=<w> on the command line: TV's row at <w>, not at the run's weight
        references = OmegaConf.merge(references or {}, {"tv": {"_target_": "jfb_ip.methods.tv_row",
                                                                "lam": float(tv_weight)}})
    run = RunCallbacks(references, cfg.grid_images)
    state = dict((ckpt.get("callbacks") or {}).get(run.references.state_key) or {})
    if tv_weight is not None:
        state.pop("tv", None)  # it holds the run's weight
    run.references.load_state_dict(state)
    trainer = _trainer(cfg, run.all(), _instantiate_dict(cfg.get("logger")))
    payload = {"ckpt_path": str(path), "data": OmegaConf.to_container(data_cfg, resolve=True)}
    if cfg.get("solver") is not None:
        payload["solver"] = OmegaConf.to_container(cfg.solver, resolve=True)
    return _test_and_write(cfg, trainer, module, datamodule, run.table, payload)


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


# how far below the best of the measurement and reference rows the model's test PSNR may fall before a warning
FAR_BELOW_DB = 6.0


def far_below(results: dict[str, Any]) -> str | None:
    """The warning for a test table whose model is far below the measurement or a reference row (a run whose
    training diverged still writes a table, which would otherwise read as a result), None when it is not."""
    model = (results.get("model") or {}).get("psnr")
    rows = {r: results[r]["psnr"] for r in table_rows(results) if r != "model" and results[r].get("psnr") is not None
            and math.isfinite(results[r]["psnr"])}
    if model is None or not rows:
        return None
    best = max(rows, key=rows.get)
    if math.isfinite(model) and model >= rows[best] - FAR_BELOW_DB:
        return None
    return (f"the model's test PSNR ({model:.2f} dB) is far below the {best} row's ({rows[best]:.2f} dB): its training "
            f"diverged or it does not fit this task; lower module.optimizer.lr and check the validation PSNR curve")


def _warn_far_below(payload: dict[str, Any]) -> None:
    warning = far_below(payload.get("test") or {})
    if warning:
        log.warning("%s", warning)
        payload.setdefault("warnings", []).append(warning)


def _test_and_write(cfg: DictConfig, trainer: L.Trainer, module: ReconstructionModule, datamodule, table: TestTable,
                    payload: dict[str, Any]) -> dict[str, Any]:
    """Test on the seeded test split; ``metrics.json`` (``payload`` + ``"test"``), ``examples.png``, the table."""
    trainer.test(module, datamodule=datamodule, verbose=False)
    payload["test"] = table.results
    _warn_far_below(payload)
    out_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:  # under DDP every process holds the table of all shards; one writes it
        write_metrics(out_dir, payload)
        examples_png(table.examples, out_dir, cfg.grid_images)
        print("\n" + format_table(table.results) + "\n")
    return payload


def default_data(cfg: DictConfig) -> None:
    """evaluate.py without a checkpoint and without a data group: train.py's default data, and TV's weight stored
    for it (the defaults list, which selects ``tv_weights`` by ``<task>_<data>``, saw no data)."""
    if cfg.get("data"):
        return
    with open_dict(cfg):
        cfg.data = OmegaConf.load(config_dir() / "data" / f"{train_default('data')}.yaml")
        path = tv_weight_path(choice("task"), train_default("data")) if choice("task") else None
        if cfg.get("tv_weight") is None and path is not None and path.is_file():
            stored = OmegaConf.load(path)  # what the defaults list would have merged
            for key in ("tv_weight", "tv_weight_task", "tv_weight_data"):
                cfg[key] = stored.get(key)


# task keys TV's weight does not depend on: the initializer moves where a solve starts, not TV's minimiser
TV_WEIGHT_IGNORES = ("init", "init_mode")
# data set keys TV's weight depends on beyond the task's (the image channels are a task key): the phantoms' generator
TV_WEIGHT_DATA_KEYS = ("style",)


def tv_weight_data(data: DictConfig | None) -> dict[str, Any]:
    """The settings of ``TV_WEIGHT_DATA_KEYS`` that the data config ``data`` has (``{}`` for photos): what a stored
    weight records as ``tv_weight_data`` and :func:`check_tv_weight_task` compares."""
    dataset = (data or {}).get("dataset") or {}
    return {k: dataset[k] for k in TV_WEIGHT_DATA_KEYS if k in dataset}


def _differences(prefix: str, now: dict, stored: dict, ignore: tuple = ()) -> list[str]:
    """``<prefix><key>=<now> (stored for <stored>)`` for every key, but ``ignore``, whose values differ."""
    return [f"{prefix}{k}={now.get(k)} (stored for {stored.get(k)})" for k in sorted(set(now) | set(stored))
            if k not in ignore and now.get(k) != stored.get(k)]


def check_tv_weight_task(cfg: DictConfig) -> None:
    """Drop TV's stored weight (``tv_weight = None``) when this run's task settings are not those it was chosen for
    (``tv_weight_task``, from the stored file): a weight tuned at noise 0.01 is no reference at noise 0.05; nor is
    one tuned on the anatomy phantoms a reference on the ellipse phantoms (``tv_weight_data``). Then ``method=tv``
    searches its weight on the validation split, the test table has no ``tv`` row, and DE-GRAD's TV initializers
    start from the default weight. An explicit ``tv_weight=<w>``, ``method.lam=<w>`` or ``references.tv.lam=<w>`` is
    kept. The initializer (``task.init``, ``task.init_mode``) may differ."""
    stored = cfg.get("tv_weight_task")
    if cfg.get("tv_weight") is None or stored is None or not cfg.get("task") or given("tv_weight"):
        return
    changed = (_differences("task.", OmegaConf.to_container(cfg.task, resolve=True),
                            OmegaConf.to_container(stored, resolve=True), ignore=TV_WEIGHT_IGNORES)
               + _differences("data.dataset.", tv_weight_data(cfg.get("data")), cfg.get("tv_weight_data") or {}))
    if not changed:
        return
    log.warning("TV's stored weight %g was chosen for other task or data settings (%s): not used; method=tv searches "
                "its weight on the validation split and the test table has no tv row (store one for these settings: "
                "python -m jfb_ip.bench.tv_weights --write <overrides>, or give method.lam / references.tv.lam)",
                cfg.tv_weight, "; ".join(changed))
    with open_dict(cfg):
        cfg.tv_weight = None


def evaluate_without_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """``evaluate.py method=<m> task=<t> [data=...]`` for a method with nothing to train (Wiener, TV, PnP-ADMM:
    :class:`~jfb_ip.methods.CalibratedMethod`): choose its lambda (and the reference rows') on the validation split,
    then test on the seeded test split, with the measurements ``train.py`` would make (same ``seed``).

    Data: the ``data`` group if given, else the task's pick (CT/MRI: phantoms), else train.py's default (natural). A data set
    without a validation split (``data=folder`` with no ``<root>/val``) is refused with the fix, since the search
    never looks at test images, unless ``method.lambda_grid=[]`` (``method.lam`` as given; the reference rows then
    keep their default weights, with a warning)."""
    from ..methods import TV, CalibratedMethod

    if not cfg.get("method"):
        raise ConfigError(f"evaluate.py needs ckpt_path=<run dir>/checkpoints/last.ckpt, or method=<m> task=<t> for "
                          f"a method with nothing to train ({', '.join(UNTRAINED_METHODS)})")
    name = choice("method") or cfg.method.get("_target_", "?")
    if not issubclass(hydra.utils.get_class(cfg.method._target_), CalibratedMethod):
        raise ConfigError(f"method={name} is learned: evaluate it from a checkpoint, ckpt_path=<run dir>/checkpoints/"
                          f"last.ckpt (python train.py method={name} writes one); without ckpt_path only methods with "
                          f"nothing to train run ({', '.join(UNTRAINED_METHODS)})")
    if not cfg.get("task"):
        raise ConfigError(f"evaluate.py method={name} needs a task: add task=<task> (e.g. task=deblur)")
    default_data(cfg)
    check_tv_weight_task(cfg)
    check_run_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    datamodule = instantiate_group(cfg, "data")
    datamodule.validate("test")
    module = build_module(OmegaConf.create({"method": run_config["method"], "task": run_config["task"],
                                            "module": {"_target_": "jfb_ip.lit.ReconstructionModule",
                                                       "seed": cfg.seed}}), run_config)
    method = module.method
    references = cfg.get("references")
    if references is not None and "tv" in references and isinstance(method, TV):
        # method=tv: the tv row would repeat the model row (the same solver at the same stored weight)
        references = {k: v for k, v in OmegaConf.to_container(references, resolve=True).items() if k != "tv"}
    run = RunCallbacks(references, cfg.grid_images)
    try:
        datamodule.validate("validate")
        has_val = True
    except DatasetError as e:
        if method.lambda_grid:
            raise ConfigError(f"{e}; method={name} chooses its weight on the validation split, never on test: add "
                              f"a validation split (data=folder: <root>/val), or set method.lambda_grid=[] to use "
                              f"method.lam={float(method.lam):g} as given") from None
        log.warning("no validation split (%s): method=%s uses method.lam=%g as given, and the reference rows their "
                    "default weights (not tuned: %s)", e, name, float(method.lam),
                    ", ".join(f"{k}={v:g}" for k, v in run.references.summary().items() if k.endswith("_lambda")))
        has_val = False
    apply_speed_switches(module, cfg.get("channels_last", False), cfg.get("compile", False))
    trainer = _trainer(cfg, run.all(), _instantiate_dict(cfg.get("logger")))
    if has_val:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    # no "val" block: the validation metrics were measured with the weights before the search ended
    payload = {"ckpt_path": None, "config": {k: run_config[k] for k in ("method", "task", "data", "seed")}}
    return _test_and_write(cfg, trainer, module, datamodule, run.table, payload)
