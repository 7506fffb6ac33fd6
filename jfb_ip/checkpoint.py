"""Reading train.py checkpoints, in one place: ``torch.load(weights_only=True)``, so a checkpoint file can never
run code, and one-line errors (:class:`CheckpointError`) instead of torch's tracebacks and key lists. Two readers:
:func:`load_checkpoint` (a whole run, for evaluate.py, resuming and the benches) and :func:`load_network` (the
network of a run, built for another method: PnP-ADMM's denoiser, MTDEQ's initialisation)."""
from __future__ import annotations

import inspect
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

# what torch.load raises on a truncated, corrupt or foreign file, or one holding objects beyond tensors and plain data
READ_ERRORS = (zipfile.BadZipFile, EOFError, RuntimeError, pickle.UnpicklingError, OSError, ValueError, KeyError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, foreign, of another method); the message names the fix."""


class UnreadableCheckpoint(ValueError):
    """The file cannot be unpickled with ``weights_only=True``; the message is the cause's first line."""


class StateMismatch(ValueError):
    """A state dict does not fit the module; the message is torch's first line naming the mismatch."""


def _first_line(e: BaseException, skip: int = 0) -> str:
    lines = [ln.strip() for ln in str(e).splitlines()[skip:] if ln.strip()]
    return (lines[0] if lines else str(e).strip() or type(e).__name__)[:200]


def read_weights_only(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; any failure is one UnreadableCheckpoint."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except READ_ERRORS as e:
        raise UnreadableCheckpoint(_first_line(e)) from None


def load_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """``module.load_state_dict(state)`` (strict); a mismatch is one StateMismatch naming the first difference."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise StateMismatch(_first_line(e, skip=1)) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by train.py, unpickled with ``weights_only=True``, with its plain-data run config.
    Every way it can be unusable is one CheckpointError."""
    path = Path(path)
    if path.is_dir():
        found = sorted(str(p) for p in [*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")])
        raise CheckpointError(f"ckpt_path={path} is a directory: give a checkpoint file"
                              + (f", e.g. ckpt_path={found[-1]}" if found else
                                 " (a run writes <run dir>/checkpoints/last.ckpt)"))
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
    check_finite(ckpt["state_dict"], f"ckpt_path={path}")
    _reference_rows_apart(ckpt)
    return ckpt


def check_finite(state: Mapping[str, Any], what: str) -> None:
    """Every floating tensor of a state dict finite; else one CheckpointError naming the first tensor that is not.
    A NaN weight makes every solve diverge, which would otherwise be reported as a solver that did not converge."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{what}: its weights are not finite ({name} holds {bad} NaN/inf of {t.numel()} "
                                  f"values): the run diverged or the file was damaged; use an earlier checkpoint")


def _reference_rows_apart(ckpt: dict[str, Any]) -> None:
    """A checkpoint that keeps the Wiener reference row inside the module (state ``wiener.*``, config
    ``module.wiener_prior``) in the layout of today's: the row's state under ``callbacks.ReferenceRows``, its config
    under ``references``, so the module's state dict holds the method alone."""
    sd, run_config = ckpt["state_dict"], ckpt["hyper_parameters"]["run_config"]
    prior = (run_config.get("module") or {}).pop("wiener_prior", None)
    if prior is not None and "references" not in run_config:
        run_config["references"] = {"wiener": {"_target_": "jfb_ip.methods.Wiener", "prior": prior}}
    if "wiener_tuned" in sd:
        sd["wiener.tuned"] = sd.pop("wiener_tuned")
    row = {k[len("wiener."):]: sd.pop(k) for k in [k for k in sd if k.startswith("wiener.")]}
    if row:
        row.setdefault("tuned", torch.tensor(False))
        ckpt.setdefault("callbacks", {}).setdefault("ReferenceRows", {"wiener": row})


def load_weights(module: nn.Module, ckpt: dict[str, Any], path) -> None:
    """Load a :func:`load_checkpoint` checkpoint's state dict into ``module`` (after its ``on_load_checkpoint``),
    naming the mismatch instead of printing torch's key lists."""
    hook = getattr(module, "on_load_checkpoint", None)
    if hook is not None:
        hook(ckpt)
    name = (ckpt["hyper_parameters"]["run_config"].get("method") or {}).get("_target_", "?")
    try:
        load_state(module, ckpt["state_dict"])
    except StateMismatch as e:
        raise CheckpointError(f"ckpt_path={path} does not match the method it names ({name}): {e}; "
                              f"was the checkpoint edited or written by another version?") from None


def check_state_fits(module: nn.Module, ckpt: dict[str, Any], path) -> None:
    """The checkpoint's state dict has exactly ``module``'s keys and shapes (before Lightning restores it, which
    would print torch's key lists): one CheckpointError naming the first difference."""
    mine = module.state_dict()
    theirs = ckpt["state_dict"]
    missing, extra = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
    shapes = [k for k in sorted(mine.keys() & theirs.keys()) if getattr(theirs[k], "shape", None) is not None
              and tuple(theirs[k].shape) != tuple(mine[k].shape)]
    if shapes:
        k = shapes[0]
        raise CheckpointError(f"ckpt_path={path} does not fit this run's model: {k} has shape {list(theirs[k].shape)} "
                              f"there and {list(mine[k].shape)} here ({len(shapes)} such tensors); resume with the "
                              f"checkpoint's method settings")
    if missing or extra:
        which = f"this run's model has {missing[0]}, the checkpoint does not" if missing else \
            f"the checkpoint holds {extra[0]}, this run's model does not"
        raise CheckpointError(f"ckpt_path={path} does not fit this run's model ({which}; {len(missing)} missing, "
                              f"{len(extra)} unexpected): resume with the checkpoint's method settings")


NET_KEY = "method.net."
DENOISER_HINT = "train one with `python train.py method=denoiser task=denoise`"


def load_network(path: str | Path | None, noise_conditioned: bool = False) -> nn.Module:
    """The network ``method.net`` of a train.py checkpoint, rebuilt and in eval mode: how a method receives a
    trained network (``method.denoiser: {_target_: jfb_ip.checkpoint.load_network, path: <ckpt>}``).

    The net is rebuilt from the checkpoint's run config ``method.net``: its ``_target_`` must be a class of
    :mod:`jfb_ip.nets` (a checkpoint cannot name arbitrary code), its other keys plain arguments; it gets the
    state-dict entries prefixed ``method.net.``. ``noise_conditioned``: the net must be called as ``net(x, sigma)``
    (sigma: (B,) noise std), as ``method=denoiser``'s and ``method=mtdeq``'s are. Every way this can fail is one
    CheckpointError naming the fix."""
    hint = f"give the last.ckpt of a train.py run of method=denoiser ({DENOISER_HINT})" if noise_conditioned else \
        "give the last.ckpt of a train.py run whose method has a network (method.net)"
    if path is None or str(path) == "":
        raise CheckpointError(f"no checkpoint given (path: null; e.g. method.denoiser.path=<run dir>/checkpoints/"
                              f"last.ckpt); {hint}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory: give the file, e.g. {path / 'checkpoints' / 'last.ckpt'}"
                              f"; {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; {hint}")
    try:
        ckpt = read_weights_only(path)
    except UnreadableCheckpoint as e:
        raise CheckpointError(f"checkpoint {path} is not a readable train.py checkpoint ({e}); {hint}") from None
    run_config = ((ckpt.get("hyper_parameters") or {}).get("run_config") or {}) if isinstance(ckpt, dict) else {}
    net_cfg = (run_config.get("method") or {}).get("net")
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    weights = {k[len(NET_KEY):]: v for k, v in state.items() if k.startswith(NET_KEY)}
    if not isinstance(net_cfg, Mapping) or not weights:
        raise CheckpointError(f"checkpoint {path} holds no network under method.net (its method is "
                              f"{(run_config.get('method') or {}).get('_target_', 'unknown')}); {hint}")
    check_finite(weights, f"checkpoint {path}")
    net = _build_net(dict(net_cfg), path, noise_conditioned)
    try:
        load_state(net, weights)
    except StateMismatch as e:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the network its config names "
                              f"({e}); was the checkpoint edited or written by another version?") from None
    return net.eval()


def _build_net(cfg: dict, path: Path, noise_conditioned: bool) -> nn.Module:
    from . import nets  # the one import above torch: the networks a checkpoint may name

    target = str(cfg.pop("_target_", ""))
    name = target.rpartition(".")[2]
    if not target.startswith("jfb_ip.nets.") or name not in nets.__all__ or not inspect.isclass(getattr(nets, name)):
        raise CheckpointError(f"checkpoint {path}: its net is {target or 'unnamed'}, not a network of jfb_ip.nets")
    if any(isinstance(v, Mapping) for v in cfg.values()) or any(k.startswith("_") for k in cfg):
        raise CheckpointError(f"checkpoint {path}: its net config holds nested objects or Hydra keys "
                              f"({sorted(cfg)}); only plain arguments can be rebuilt")
    cls = getattr(nets, name)
    params = list(inspect.signature(cls.forward).parameters)
    if noise_conditioned and len(params) < 3:  # self, x, sigma
        raise CheckpointError(f"checkpoint {path}: its net {name} takes no noise level (forward{tuple(params[1:])}); "
                              f"a noise-conditioned net(x, sigma) is needed: {DENOISER_HINT}")
    try:
        return cls(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its net config does not build {name} ({e})") from None
