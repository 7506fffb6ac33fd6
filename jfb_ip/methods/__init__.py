"""Reconstruction methods: maps and stage loops composing physics, nets and solvers."""
from .base import FixedPointMethod, Method
from .classical import Wiener
from .degrad import DEGRAD

__all__ = ["Method", "FixedPointMethod", "DEGRAD", "Wiener"]
