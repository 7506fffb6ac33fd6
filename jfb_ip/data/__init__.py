"""Datasets of clean images and the DataModule."""
from .datamodule import ImageDataModule
from .images import CelebA, DatasetError, DatasetNotFoundError, ImageFolder
from .natural import NATURAL_SPLITS, NaturalImages
from .phantoms import Phantoms

__all__ = ["ImageDataModule", "ImageFolder", "CelebA", "NaturalImages", "NATURAL_SPLITS", "Phantoms", "DatasetError",
           "DatasetNotFoundError"]
