"""The LightningDataModule: clean images only; measurements are made on the device."""
from __future__ import annotations

from typing import Callable

import lightning as L
from torch.utils.data import DataLoader, Dataset


class ImageDataModule(L.LightningDataModule):
    """Wraps a dataset factory ``dataset(split=..., image_size=..., channels=...)``.

    Args:
        dataset: partial dataset constructor (``_partial_: true`` in the config).
        root: dataset location, passed to the dataset when set (folder, CelebA).
        image_size, channels: passed to every split.
        batch_size, eval_batch_size, num_workers: loader settings.
        splits: which splits exist (evaluate.py on a folder needs only 'test').
    """

    def __init__(self, dataset: Callable[..., Dataset], root: str | None = None, image_size: int = 48,
                 channels: int = 3, batch_size: int = 16, eval_batch_size: int | None = None, num_workers: int = 0):
        super().__init__()
        self.dataset_fn = dataset
        self.root = root
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self._splits: dict[str, Dataset] = {}

    def split(self, name: str) -> Dataset:
        if name not in self._splits:
            extra = {} if self.root is None else {"root": self.root}
            self._splits[name] = self.dataset_fn(split=name, image_size=self.image_size, channels=self.channels, **extra)
        return self._splits[name]

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.split("train"), self.split("val")
        if stage == "validate":
            self.split("val")
        if stage in ("test", None):
            self.split("test")

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        ds = self.split(name)
        # drop a ragged last training batch, unless that would leave no batch at all
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle and len(ds) > batch_size, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
