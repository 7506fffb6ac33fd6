"""Reconstruction methods: maps and stage loops composing physics, nets and solvers."""
from .base import Equilibrium, FixedPointMethod, Method, Reconstruction
from .calibrated import CalibratedMethod
from .classical import Wiener, tikhonov
from .degrad import DEGRAD
from .denoiser import Denoiser
from .deprox import DEProx
from .mtdeq import MTDEQ
from .pnp import PnPADMM
from .tv import TV, tv_row, tv_solve
from .unrolled import LUDnCNN, LUSER, UnrolledMethod

__all__ = ["Method", "Reconstruction", "FixedPointMethod", "Equilibrium", "DEGRAD", "DEProx", "LUDnCNN", "LUSER",
           "UnrolledMethod", "Wiener", "tikhonov", "CalibratedMethod", "Denoiser", "PnPADMM", "TV", "tv_row",
           "tv_solve", "MTDEQ"]
