"""``python -m jfb_ip.evaluate [overrides]``: evaluate.py for an installed package (same configs)."""
import sys

import hydra
from omegaconf import DictConfig

from . import config_dir
from .lit.errors import ConfigError, main_guard
from .lit.run import evaluate
from .lit.validate import check_command_line


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def _main(cfg: DictConfig) -> None:
    main_guard(evaluate, cfg)


def main() -> None:
    """The command-line checks Hydra cannot make well (output directory, overrides), then the Hydra app."""
    try:
        check_command_line("evaluate", sys.argv[1:])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    _main()


if __name__ == "__main__":
    main()
