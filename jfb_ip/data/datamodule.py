"""The LightningDataModule: clean images only; measurements are made on the device."""
from __future__ import annotations

import inspect
import logging
from typing import Callable

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .images import DatasetError, check_channels, check_int
from .sampling import ResumableSampler, SeededItems

log = logging.getLogger(__name__)

# Which splits each stage needs. "fit" includes test: the test split runs after training, and a
# missing or broken test/ must not be found only after hours of it.
STAGE_SPLITS = {"fit": ("train", "val", "test"), "validate": ("val",), "test": ("test",)}


class ImageDataModule(L.LightningDataModule):
    """Wraps a dataset factory ``dataset(split=..., image_size=..., channels=...)``.

    Args:
        dataset: partial dataset constructor (``_partial_: true`` in the config).
        root: dataset location, passed to the dataset when set (folder, CelebA); a dataset that
            takes no ``root`` (the embedded natural images) refuses it.
        image_size (>= 1), channels (1 or 3): passed to every split.
        batch_size, eval_batch_size (>= 1; eval defaults to batch_size), num_workers (>= 0): loader settings.
        seed: the training order and crops are functions of (seed, epoch, position)
            (:mod:`jfb_ip.data.sampling`); the checkpoint holds where the epoch stood, so a resumed run continues
            with the very batches an uninterrupted one would train on.

    Bad values raise DatasetError (a ValueError) naming the ``data.*`` key at construction;
    :meth:`validate` checks the files of the splits a stage needs before training starts.
    """

    def __init__(self, dataset: Callable[..., Dataset], root: str | None = None, image_size: int = 48,
                 channels: int = 3, batch_size: int = 16, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        if not callable(dataset):
            raise DatasetError(f"data.dataset must be a dataset class with _partial_: true, got {dataset!r}")
        self.dataset_fn = dataset
        self.image_size = check_int("data.image_size", image_size, 1)
        self.channels = check_channels(channels)
        self.batch_size = check_int("data.batch_size", batch_size, 1)
        # checked before `or`: eval_batch_size=0 must fail, not quietly become batch_size
        eval_batch_size = check_int("data.eval_batch_size", eval_batch_size, 1, allow_none=True)
        self.eval_batch_size = eval_batch_size or self.batch_size
        self.num_workers = check_int("data.num_workers", num_workers, 0)
        if root is not None and not _takes(dataset, "root"):
            name = getattr(getattr(dataset, "func", dataset), "__name__", "this dataset")
            hint = (" (its photos are embedded scikit-image samples); for your own images use data=folder "
                    "data.root=<dir> with <dir>/train, <dir>/val, <dir>/test") if name == "NaturalImages" else ""
            raise DatasetError(f"data.root={root!r} is given but {name} takes no root{hint}; drop data.root")
        self.root = root
        self.seed = int(seed)
        self._splits: dict[str, Dataset] = {}
        self._resume: dict[str, int] | None = None
        self._train_sampler: ResumableSampler | None = None

    def split(self, name: str) -> Dataset:
        if name not in self._splits:
            extra = {} if self.root is None else {"root": self.root}
            self._splits[name] = self.dataset_fn(split=name, image_size=self.image_size, channels=self.channels, **extra)
        return self._splits[name]

    def validate(self, stage: str = "fit") -> None:
        """Build and check every split ``stage`` needs, before any training or test step.

        ``fit``: train, val and test (test runs after training, so its absence must show now);
        ``validate``: val; ``test``: test. Per split: the dataset is built (missing paths, bad
        config values), its ``check()`` runs if it has one (ImageFolder decodes every file; CelebA
        checks every file exists and decodes up to ``CelebA.CHECK_DECODE`` of them), and its first
        item must be a float (channels, image_size, image_size) image in [0, 1]. The global torch
        RNG is left as it was, so validating changes no random crop or shuffle. Raises DatasetError.
        """
        if stage not in STAGE_SPLITS:
            raise ValueError(f"validate: stage must be one of {list(STAGE_SPLITS)}, got {stage!r}")
        with torch.random.fork_rng(devices=[]):
            for name in STAGE_SPLITS[stage]:
                ds = self.split(name)
                if len(ds) == 0:
                    raise DatasetError(f"the {name} split of {type(ds).__name__} is empty: it must hold at least "
                                       f"one image")
                check = getattr(ds, "check", None)
                if callable(check):
                    check()
                self._check_item(name, ds[0][0])

    def _check_item(self, split: str, x: Tensor) -> None:
        want = (self.channels, self.image_size, self.image_size)
        if not isinstance(x, Tensor) or tuple(x.shape) != want or not x.dtype.is_floating_point:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise DatasetError(f"the {split} split yields {got}, not a float image of shape {want} "
                               f"(data.channels, data.image_size)")
        lo, hi = float(x.min()), float(x.max())
        if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
            raise DatasetError(f"the {split} split yields pixel values in [{lo:g}, {hi:g}], not in [0, 1]")

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self.split("train"), self.split("val")
        if stage == "validate":
            self.split("val")
        if stage in ("test", None):
            self.split("test")

    def _loader(self, name: str, batch_size: int) -> DataLoader:
        ds = self.split(name)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if name != "train":
            return DataLoader(ds, batch_size=batch_size, num_workers=self.num_workers,
                              sampler=eval_sampler(ds, world, rank), persistent_workers=self.num_workers > 0)
        sampler = self._train_sampler = ResumableSampler(ds, self.seed, num_replicas=world, rank=rank)
        if self._resume is not None:
            sampler.resume_at(self._resume["epoch"], self._resume["batches"] * batch_size)
            self._resume = None
        # drop a ragged last training batch, unless that would leave no batch at all
        return DataLoader(SeededItems(ds), batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=len(sampler) > batch_size, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """Where the training epoch stands, saved in every checkpoint: the epoch and the batches of it trained on
        (Lightning's count of processed batches; the current one included when the checkpoint is written at its
        end)."""
        trainer, sampler = self.trainer, self._train_sampler
        if trainer is None or sampler is None:
            return {}
        # the sampler's epoch, not trainer.current_epoch: after an epoch's last batch Lightning already counts the
        # next epoch while the batch count is still the finished one's
        return {"epoch": sampler.epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)


def _takes(fn: Callable, param: str) -> bool:
    """Whether ``fn`` (a class or functools.partial of one) accepts the keyword ``param``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return True
    return param in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def eval_sampler(dataset: Dataset, world_size: int, rank: int) -> DistributedSampler | None:
    """The validation/test sampler under DDP: Lightning's ``UnrepeatedDistributedSampler`` (shards of sizes that
    differ by at most one, no repeated image). Lightning's own choice, torch's ``DistributedSampler``, pads the
    shards by repeating the first images so all have one length, and those would count twice in every validation
    and test mean. Lightning keeps a sampler that already is a ``DistributedSampler``. None in one process."""
    if world_size <= 1:
        return None
    if len(dataset) < world_size:
        # a process without a single batch would leave the others waiting in DDP's first buffer broadcast
        raise DatasetError(f"the evaluation split has {len(dataset)} images, fewer than the {world_size} processes: "
                           f"use fewer devices (trainer.devices) or more images")
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
