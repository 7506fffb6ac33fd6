"""Reconstruction methods: maps and stage loops composing physics, nets and solvers."""
from .base import Equilibrium, FixedPointMethod, Method, Reconstruction
from .classical import Wiener, tikhonov
from .degrad import DEGRAD
from .deprox import DEProx
from .unrolled import LUDnCNN, LUSER, UnrolledMethod

__all__ = ["Method", "Reconstruction", "FixedPointMethod", "Equilibrium", "DEGRAD", "DEProx", "LUDnCNN", "LUSER",
           "UnrolledMethod", "Wiener", "tikhonov"]
