"""Datasets of clean images and the DataModule."""
from .datamodule import ImageDataModule
from .images import CelebA, DatasetNotFoundError, ImageFolder
from .natural import NaturalImages

__all__ = ["ImageDataModule", "ImageFolder", "CelebA", "NaturalImages", "DatasetNotFoundError"]
