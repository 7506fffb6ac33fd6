"""jfb-ip: implicit networks and their unrolled cousins for imaging inverse problems."""
import hashlib
from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> Path:
    """The Hydra config directory: ``conf/`` of a checkout, shipped in the package as ``jfb_ip/conf``."""
    return Path(__file__).resolve().parent / "conf"


def tv_weight_path(task: str, data: str) -> Path:
    """Where ``python -m jfb_ip.bench.tv_weights --write`` stores TV's weight for ``task`` on ``data`` (the config
    group ``tv_weights``, which ``train.yaml`` and ``evaluate.yaml`` select as ``<task>_<data>``)."""
    return config_dir() / "tv_weights" / f"{task}_{data}.yaml"


def stored_tv_weight(task: str, data: str) -> float | None:
    """TV's weight stored for ``task`` on ``data``; None if none is stored."""
    path = tv_weight_path(task, data)
    return float(OmegaConf.load(path).tv_weight) if path.is_file() else None


def short_dirname(text: str, limit: int = 200) -> str:
    """``text`` as one directory name: path separators replaced, and if longer than ``limit`` its head plus a hash
    of the whole, so a sweep job's ``<num>_<overrides>`` stays under the file system's 255-byte limit (Hydra's
    ``override_dirname`` grows with every override) and still differs per job."""
    text = str(text).replace("/", "_")
    if len(text) <= limit:
        return text
    return f"{text[:limit - 11]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def job_suffix() -> str:
    """``-j<job number>`` inside a Hydra multirun, else empty: what makes the wandb run names of a sweep's jobs
    distinct (a single run has no job number)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return ""
    return f"-j{hc.job.num}" if hc.mode == RunMode.MULTIRUN else ""


# used by conf/hydra/default.yaml (sweep subdir) and conf/logger/wandb.yaml (run name)
OmegaConf.register_new_resolver("jfb_ip.short_dirname", short_dirname, replace=True)
OmegaConf.register_new_resolver("jfb_ip.job_suffix", job_suffix, replace=True)
# conf/method/degrad.yaml: the network's input channels, doubled when the initializer is injected
OmegaConf.register_new_resolver("jfb_ip.injected_channels",
                                lambda c, inject: int(c) * (1 if inject in (None, "none") else 2), replace=True)


# conf/method/degrad.yaml: TV's stored weight (conf/tv_weights/) or a default
OmegaConf.register_new_resolver("jfb_ip.or", lambda value, default: default if value is None else value, replace=True)
