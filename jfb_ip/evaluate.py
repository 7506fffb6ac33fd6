"""``python -m jfb_ip.evaluate [overrides]``: evaluate.py for an installed package (same configs)."""
import hydra
from omegaconf import DictConfig

from . import config_dir
from .lit.errors import main_guard
from .lit.run import evaluate


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    main_guard(evaluate, cfg)


if __name__ == "__main__":
    main()
