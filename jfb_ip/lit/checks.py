"""Config checks that run before anything is trained or read: each refusal is one :class:`ConfigError` naming the
fix. Also the building of one config group with its error in one line (:func:`instantiate_group`)."""
from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from .. import config_dir
from .errors import ConfigError, innermost
from .validate import check_options

# what evaluate.py runs without a checkpoint (methods with nothing to train)
UNTRAINED_METHODS = ("method=wiener", "method=tv", "method=pnp_admm")


def instantiate_group(cfg: DictConfig, group: str, **kwargs):
    """Build one config group; an error names the group and its cause in one line (ConfigError)."""
    try:
        return hydra.utils.instantiate(cfg[group], **kwargs)
    except InstantiationException as e:
        cause = innermost(e)
        given = [o for o in overrides() if o.lstrip("+~").startswith((f"{group}.", f"{group}="))]
        hint = f"you set {', '.join(given)}" if given else f"check the {group}.* values"
        spec = cfg.get("specialization")
        if spec and group in _specialization_keys(spec):  # merged into whatever the group's options chose
            hint += (f"; conf/method_task/{spec}.yaml sets {group} keys too: drop one with '~{group}.<key>', all of "
                     f"them with '~method_task'")
        raise ConfigError(f"could not build `{group}` ({cfg[group].get('_target_', '?')}): "
                          f"{cause if cause is not e else str(e).strip().splitlines()[-1]} ({hint})") from None


def _specialization_keys(spec: str) -> list[str]:
    """The top-level keys that conf/method_task/<spec>.yaml sets (it is a ``_global_`` package)."""
    path = config_dir() / "method_task" / f"{spec}.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []


def overrides() -> list[str]:
    """The command-line overrides of this run (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def choice(group: str) -> str | None:
    """The option picked for a config group in this run (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        return None


def given(key: str) -> bool:
    """Whether this Hydra run's command line sets ``key`` (``tv_weight=1e-3``, ``+key=...``; False outside a Hydra
    app)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return False
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def train_default(group: str) -> str:
    """The option conf/train.yaml's defaults list picks for ``group`` (evaluate.py's default data is train.py's)."""
    for item in OmegaConf.load(config_dir() / "train.yaml").defaults:
        if isinstance(item, DictConfig) and group in item:
            return item[group]
    raise KeyError(f"conf/train.yaml has no default for {group}")


def check_run_config(cfg: DictConfig) -> None:
    """Config errors that no single group can see, raised before anything runs; first every option's type and
    range (:func:`~jfb_ip.lit.validate.check_options`)."""
    check_options(cfg)
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
    check_fixed_point_groups(cfg)


def check_fixed_point_groups(cfg: DictConfig) -> None:
    """The ``solver`` and ``backward`` groups are composed by the methods with a fixed point (their configs pick
    both, conf/method/degrad.yaml) and null otherwise; one given on the command line to a method that has no use for
    it (``method=tv solver=broyden``) is refused rather than ignored."""
    method = cfg.get("method")
    if not method:
        return
    for group, key in (("solver", "name"), ("backward", "mode")):
        node = cfg.get(group)
        if node is not None and group not in method:
            raise ConfigError(f"method={choice('method') or method.get('_target_', '?')} has no "
                              f"{'fixed point to solve' if group == 'solver' else 'backward mode to choose'}, so "
                              f"{group}={node.get(key, '?')} cannot apply: drop the {group}= override")


def check_task_data(cfg: DictConfig) -> None:
    """``cfg.task``'s needs against ``cfg.data`` (channels, a size the operator accepts), as one
    ConfigError naming the fix (``Task.check_data``), before any data is read or model built."""
    task = instantiate_group(cfg, "task")
    try:
        task.check_data(int(cfg.data.channels), int(cfg.data.image_size))
    except ValueError as e:
        raise ConfigError(f"task={choice('task') or task.name} {e}") from None


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
    Measured on the deblurring default: averaged vectors of norm 0.53-0.69, validation 5.7 dB, Lip(T) 48000
    (docs/results.md, "What did not help"). With ``use_buffers=false`` torch's AveragedModel averages the
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
