"""``python -m jfb_ip.train [overrides]``: train.py for an installed package (same configs)."""
import hydra
from omegaconf import DictConfig

from . import config_dir
from .lit.errors import main_guard
from .lit.run import train_objective


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the value of ``optimized_metric`` (None unless set) for Hydra's sweepers (Optuna)."""
    return main_guard(train_objective, cfg)


if __name__ == "__main__":
    main()
