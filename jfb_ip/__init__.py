"""jfb-ip: implicit networks and their unrolled cousins for imaging inverse problems."""
import hashlib
from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> Path:
    """The Hydra config directory: ``conf/`` of a checkout, shipped in the package as ``jfb_ip/conf``."""
    return Path(__file__).resolve().parent / "conf"


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
