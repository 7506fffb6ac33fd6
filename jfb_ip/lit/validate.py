"""Every boolean and numeric option checked once, before anything is built: a value of the wrong type, NaN, an
infinity or a number out of range is one :class:`ConfigError` naming the key, the value and the valid range.

Two sources, so that an option nobody listed is still covered by its class:

- :data:`OPTIONS`, a table of the run's options (key pattern, type, range); ``*`` matches one key level.
- the signature of every ``_target_`` in the config: an argument annotated ``bool``, ``int`` or ``float`` (or
  ``X | None``) must receive that type (``compile=no`` is a string, not False; ``depth=2.5`` is not an integer).

Whatever the source, a float option never takes NaN, and takes an infinity only where its rule says so."""
from __future__ import annotations

import difflib
import inspect
import math
import os
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from .. import config_dir
from .errors import ConfigError

INF = math.inf


@dataclass(frozen=True)
class Option:
    """``key`` (dotted, ``*`` for any one key) takes a ``kind`` (bool, int or float) in ``[low, high]`` (ends open
    where ``open_low``/``open_high``), or one of ``also``; ``null``: None is accepted; a float may be a list of such
    floats where ``listed`` (a range to draw from: ``task.noise_std=[0,0.2]``)."""
    key: str
    kind: type
    low: float = -INF
    high: float = INF
    open_low: bool = False
    open_high: bool = False
    null: bool = False
    also: tuple = ()
    listed: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if value in self.also and type(value) is not bool:
            return True
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if math.isnan(value):
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def valid(self) -> str:
        extra = [repr(a) for a in self.also] + (["null"] if self.null else [])
        if self.kind is bool:
            return "true or false" + (f" (or {' or '.join(extra)})" if extra else "")
        name = "an integer" if self.kind is int else "a number"
        lo, hi = ("(" if self.open_low else "[") + _fmt(self.low), _fmt(self.high) + (")" if self.open_high else "]")
        if self.low == -INF and self.high == INF:
            text = f"{name}, finite" if self.high == INF and self.open_high else name
        elif self.high == INF:
            text = f"{name} {'>' if self.open_low else '>='} {_fmt(self.low)}" + \
                   ("" if self.kind is int or not self.open_high else ", finite")
        else:
            text = f"{name} in {lo}, {hi}"
        return text + (f" (or {' or '.join(extra)})" if extra else "")


def _fmt(x: float) -> str:
    return "inf" if x == INF else "-inf" if x == -INF else f"{x:g}"


def positive(key: str, **kw) -> Option:
    """A finite number > 0."""
    return Option(key, float, 0.0, INF, open_low=True, open_high=True, **kw)


def nonneg(key: str, **kw) -> Option:
    """A finite number >= 0."""
    return Option(key, float, 0.0, INF, open_high=True, **kw)


def count(key: str, low: int = 1, **kw) -> Option:
    return Option(key, int, low, INF, **kw)


def fraction(key: str, **kw) -> Option:
    """A relative tolerance: in (0, 1)."""
    return Option(key, float, 0.0, 1.0, open_low=True, open_high=True, **kw)


def flag(key: str) -> Option:
    return Option(key, bool)


OPTIONS: tuple[Option, ...] = (
    # the run
    Option("seed", int, 0, 2 ** 32 - 1),
    count("grid_images"),
    *map(flag, ("train", "test", "compile", "channels_last")),
    # trainer (the run length and its checks; Lightning's own checks come after the model is built)
    count("trainer.max_steps", also=(-1,)),
    count("trainer.max_epochs", also=(-1,), null=True),
    count("trainer.check_val_every_n_epoch", null=True),
    count("trainer.log_every_n_steps"),
    count("trainer.num_sanity_val_steps", low=-1),
    *map(flag, ("trainer.enable_progress_bar", "trainer.inference_mode", "trainer.enable_checkpointing",
                "trainer.enable_model_summary", "trainer.benchmark")),
    Option("trainer.deterministic", bool, null=True, also=("warn",)),
    # the module: optimizer, schedule, clipping
    positive("module.optimizer.lr"),
    nonneg("module.optimizer.weight_decay"),
    Option("module.optimizer.momentum", float, 0.0, 1.0, open_high=True),
    positive("module.optimizer.eps"),
    count("module.scheduler.T_max"),
    nonneg("module.scheduler.eta_min"),
    positive("module.gradient_clip_val", null=True),
    count("module.max_skipped_batches"),
    count("module.image_log_every_n_epochs"),
    Option("module.seed", int, 0, 2 ** 32 - 1),
    flag("module.fixed_train_noise"),
    # the equilibrium solve (top-level groups and their copies under a method, e.g. LUSER's inner solve)
    *[o for prefix in ("solver", "method.solver", "method.*.solver") for o in (
        fraction(f"{prefix}.tol"), fraction(f"{prefix}.train_tol", null=True), count(f"{prefix}.max_iter"),
        count(f"{prefix}.m"), nonneg(f"{prefix}.lam"), positive(f"{prefix}.beta"),
        Option(f"{prefix}.bound", float, 0.0, INF, open_low=True))],
    *[o for prefix in ("backward", "method.backward", "method.*.backward") for o in (
        fraction(f"{prefix}.backward_tol", null=True), count(f"{prefix}.backward_max_iter", null=True),
        count(f"{prefix}.neumann_k", low=0), count(f"{prefix}.phantom_k"),
        Option(f"{prefix}.phantom_damping", float, 0.0, 1.0, open_low=True),
        count(f"{prefix}.unroll_steps", null=True))],
    # the task: its noise and operator
    nonneg("task.noise_std", listed=True),
    count("task.kernel_size"),
    positive("task.variance", listed=True),
    Option("task.p_drop", float, 0.0, 1.0, open_high=True, listed=True),
    count("task.factor", listed=True),
    count("task.channels", null=True),
    # the method and its network
    positive("method.net.gamma"),
    count("method.net.width"),
    count("method.net.depth", low=2),
    count("method.net.in_channels"),
    count("method.net.out_channels", null=True),
    *map(flag, ("method.net.batch_norm", "method.net.spectral_norm", "method.net.residual", "method.net.bias")),
    positive("method.eta", null=True),
    positive("method.reg_weight"),
    nonneg("method.contraction_penalty"),
    positive("method.contraction_target"),
    count("method.contraction_iters"),
    fraction("method.initializer_tol"),
    count("method.initializer_max_iter"),
    positive("method.tv_weight"),
    positive("method.tv_eps"),
    positive("tv_weight", null=True),
    Option("method.gate_init", float, -INF, INF, open_high=True),
    count("method.n_stages"),
    count("method.stages"),
    *map(flag, ("method.tv_prior", "method.learn_tv_weight", "method.reg_relative", "method.learn_reg_weight",
                "method.log_lipschitz", "method.aux_loss")),
)


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        for k in node.keys():
            if isinstance(k, str) and k.startswith("_") and k.endswith("_"):
                continue  # _target_, _partial_, _convert_: Hydra's keys
            child = node._get_node(k)
            if child is not None and child._is_interpolation() and not _resolvable(node, k):
                continue
            yield from _leaves(node[k], f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
    else:
        yield prefix, node


def _resolvable(node: DictConfig, key: str) -> bool:
    try:
        node[key]
        return True
    except Exception:  # an interpolation to the Hydra runtime (${hydra:...}) outside an app: not an option value
        return False


def _match(pattern: str, key: str) -> bool:
    p, k = pattern.split("."), key.split(".")
    return len(p) == len(k) and all(a in ("*", b) for a, b in zip(p, k))


def _as_python(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check_options(cfg: DictConfig) -> None:
    """Refuse every option of ``cfg`` that its rule (the table, else its ``_target_``'s annotation) does not accept,
    every NaN anywhere, and every infinity no rule allows: one ConfigError naming key, value and valid range."""
    check_unknown_top_level_keys(cfg)
    typed = dict(_annotated(cfg))
    for key, value in _leaves(cfg):
        value = _as_python(value)
        rule = next((o for o in OPTIONS if _match(o.key, key)), None) or typed.get(key)
        if rule is not None:
            values = value if rule.listed and isinstance(value, list) and value else [value]
            if not all(rule.accepts(v) for v in values):
                raise ConfigError(f"{key}={_show(value)}{_origin(cfg, key)}: {key} must be {rule.valid()}; set it "
                                  f"in that range")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={_show(value)}: {key} must be a finite number")
        elif isinstance(value, list) and any(isinstance(v, float) and math.isnan(v) for v in value):
            raise ConfigError(f"{key}={_show(value)}: {key} must hold finite numbers")


def _origin(cfg: DictConfig, key: str) -> str:
    """`` (from ${trainer.max_steps})`` where the value is an interpolation of another key: that key is the fix."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    child = node._get_node(last) if isinstance(node, DictConfig) else None
    return f" (from {child._value()})" if child is not None and child._is_interpolation() else ""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


# the annotations a signature may carry and the rule each gives (anything else is not checked here)
_ANNOTATED = {bool: Option("", bool), int: Option("", int), float: Option("", float, open_low=True, open_high=True)}


def _annotated(cfg: DictConfig) -> Iterator[tuple[str, Option]]:
    """(key, rule) for every argument of a ``_target_`` in ``cfg`` annotated bool, int or float (or X | None)."""
    def walk(node: Any, prefix: str):
        if isinstance(node, DictConfig):
            target = node.get("_target_") if "_target_" in node else None
            hints = _hints(target) if isinstance(target, str) else {}
            for k in node.keys():
                key = f"{prefix}.{k}" if prefix else str(k)
                if k in hints:
                    yield key, hints[k]
                child = node._get_node(k)
                if child is not None and child._is_interpolation() and not _resolvable(node, k):
                    continue
                yield from walk(node[k], key)
    yield from walk(cfg, "")


@lru_cache(maxsize=None)
def _hints(target: str) -> dict[str, Option]:
    try:
        obj = hydra.utils.get_object(target)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(fn)
    except Exception:  # a target that cannot be imported is refused when built, with its own message
        return {}
    out = {}
    for name, hint in hints.items():
        args = typing.get_args(hint)
        null = type(None) in args
        inner = [a for a in args if a is not type(None)] if args else [hint]
        if len(inner) == 1 and inner[0] in _ANNOTATED and typing.get_origin(hint) in (None, typing.Union,
                                                                                     getattr(__import__("types"),
                                                                                             "UnionType", None)):
            base = _ANNOTATED[inner[0]]
            out[name] = Option(name, base.kind, open_low=base.open_low, open_high=base.open_high, null=null)
    return out


def _top_level_keys(config_name: str) -> set[str]:
    """The keys a run's config may hold at the top: those its yaml sets, its defaults list's groups, and those any
    config file of the tree sets at the top (``# @package _global_``: experiments, debug, method_task)."""
    root = Path(config_dir())
    path = root / f"{config_name}.yaml"
    if not path.is_file():
        return set()
    conf = OmegaConf.load(path)
    keys = {str(k) for k in conf.keys() if k != "defaults"} | {"hydra", "module", "references", "callbacks"}
    for item in conf.get("defaults", []):
        if isinstance(item, DictConfig):
            for group in item.keys():
                keys.add(str(group).replace("optional ", "").replace("override ", "").strip("/").split("@")[0])
    for file in root.rglob("*.yaml"):
        text = file.read_text()
        if "@package _global_" in text.split("\n", 3)[0:3].__str__():
            keys |= {str(k) for k in (OmegaConf.create(text) or {}).keys() if k != "defaults"}
    return keys


def check_unknown_top_level_keys(cfg: DictConfig) -> None:
    """``+foo=1`` adds a key nothing reads (Hydra's own hint suggests the ``+`` for an unknown ``foo=1``): refused,
    with the nearest known key."""
    from .checks import overrides

    added = [o for o in overrides() if o.startswith("+")]
    if not added:
        return
    name = str(cfg.get("task_name", "train"))
    known = _top_level_keys(name)
    for o in added:
        key = o.lstrip("+").split("=", 1)[0].split(".", 1)[0]
        if known and key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {near[0]}?" if near else f"the options are {', '.join(sorted(known))}"
            raise ConfigError(f"{o} adds {key}, which is not an option of {name}.py and nothing would read it: drop "
                              f"it; {hint}")


# what a resumed run must share with its checkpoint's run: the model it trains and the problem it solves
RESUME_FIXED = ("method", "task", "data.channels")
# what may differ without changing the result's meaning, so it goes unmentioned (the run length has its own warning)
RESUME_QUIET = ("ckpt_path", "paths", "trainer", "logger", "callbacks", "hydra", "tags", "task_name", "train", "test",
                "grid_images", "module.scheduler.T_max", "optimized_metric", "hparams_search", "launcher")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}


def check_resume(saved: dict, run: dict, path) -> list[str]:
    """A run resumed from ``path`` against the run that wrote it (both resolved run configs). Another method, net
    shape, task or channel count is refused (one ConfigError listing the keys); the other changed keys (seed, batch
    size, image size, ...) are returned as ``key old -> new`` for a warning: the run goes on, but will not end where
    an uninterrupted one would. The equilibrium options (``solver``, ``backward``) may change."""
    old, new = _flat(saved), _flat(run)
    within = lambda k, keys: any(k == p or k.startswith(p + ".") for p in keys)  # noqa: E731
    solve = lambda k: any(part in ("solver", "backward") for part in k.split("."))  # noqa: E731
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    # a key on one side only is an option added or removed between versions of jfb-ip: listed, not refused
    fixed = [k for k in changed if within(k, RESUME_FIXED) and not solve(k) and (k in old and k in new)]
    show = lambda k: f"{k}: {_show(old.get(k))} -> {_show(new.get(k))}"  # noqa: E731
    if fixed:
        raise ConfigError(f"ckpt_path={path} was trained with another model or task ({'; '.join(map(show, fixed[:6]))}"
                          f"{'; ...' if len(fixed) > 6 else ''}): resume with the checkpoint's method, task and "
                          f"data.channels (drop those overrides), or start a new run without ckpt_path")
    return [show(k) for k in changed if not within(k, RESUME_QUIET) and not within(k, RESUME_FIXED)]


# what evaluate.py takes beside ckpt_path=: the checkpoint brings its model, task and backward mode
EVALUATE_WITH_CHECKPOINT = ("data=<group> [data.*]", "solver=<name> [solver.*]", "seed", "trainer.*", "grid_images",
                            "channels_last", "compile", "paths.*", "hydra.*", "logger=")


def check_command_line(config_name: str, argv: list[str]) -> None:
    """The command-line errors Hydra would report with a traceback or a misleading hint, caught before it composes:
    an output directory that cannot be made (under /proc, on a file, under /dev/null), and on evaluate.py with a
    checkpoint the overrides it cannot take (the model's keys, or data.* / solver.* without their group)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    pairs = [(a.split("=", 1)[0], a.split("=", 1)[1]) for a in argv if "=" in a and not a.startswith("-")]
    for key, value in pairs:
        plain = key.lstrip("+~")
        if plain in ("hydra.run.dir", "hydra.sweep.dir", "paths.output_dir") and value and "${" not in value:
            used = plain == "paths.output_dir" or (plain == "hydra.sweep.dir") == multirun
            _check_output_dir(plain, value, create=used)
    if config_name != "evaluate" or not any(k == "ckpt_path" and v not in ("", "null") for k, v in pairs):
        return
    groups = {k.lstrip("+~") for k, _ in pairs}
    for key, value in pairs:
        plain = key.lstrip("+~")
        top = plain.split(".", 1)[0]
        if top in ("method", "task", "backward"):
            raise ConfigError(f"{key}={value}: evaluate.py with ckpt_path= takes the method, task and backward mode "
                              f"from the checkpoint, so {top} overrides are refused; it takes "
                              f"{', '.join(EVALUATE_WITH_CHECKPOINT)}")
        if top in ("data", "solver") and "." in plain and top not in groups:
            example = "data=natural" if top == "data" else "solver=anderson"
            raise ConfigError(f"{key}={value}: evaluate.py with ckpt_path= takes {top}.* only with a {top} group "
                              f"that replaces the checkpoint's (e.g. {example} {key}={value})")


def _check_output_dir(key: str, value: str, create: bool) -> None:
    path = Path(value).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise FileExistsError(17, "a file is there, not a directory", str(path))
        if create:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(13, "not writable", str(path))
    except OSError as e:
        raise ConfigError(f"{key}={value}: the output directory cannot be made ({e.strerror or e}: {e.filename or path})"
                          f"; give a writable directory path") from None
