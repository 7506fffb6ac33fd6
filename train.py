"""Train a reconstruction method: python train.py [method=...] [task=...] [backward=...] [data=...]"""
import hydra
from omegaconf import DictConfig

from jfb_ip.lit.run import main_guard, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    main_guard(train, cfg)


if __name__ == "__main__":
    main()
