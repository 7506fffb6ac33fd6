"""jfb-ip: implicit networks and their unrolled cousins for imaging inverse problems."""
from pathlib import Path


def config_dir() -> Path:
    """The Hydra config directory: ``conf/`` of a checkout, shipped in the package as ``jfb_ip/conf``."""
    return Path(__file__).resolve().parent / "conf"
