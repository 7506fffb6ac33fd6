"""Evaluate a checkpoint: python evaluate.py ckpt_path=<ckpt> [data=folder data.root=<dir>]"""
import hydra
from omegaconf import DictConfig

from jfb_ip.lit.run import evaluate, main_guard


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    main_guard(evaluate, cfg)


if __name__ == "__main__":
    main()
