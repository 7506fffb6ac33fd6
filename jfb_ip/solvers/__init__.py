"""Fixed-point solvers and backward modes; they see tensors with a batch dimension, never images."""
from .backward import BACKWARD_MODES, register_backward
from .equilibrium import equilibrium
from .forward import FORWARD_SOLVERS, anderson, broyden, fixed_point, register_forward
from .stats import SolverStats

__all__ = ["equilibrium", "anderson", "broyden", "fixed_point", "SolverStats", "FORWARD_SOLVERS", "BACKWARD_MODES",
           "register_forward", "register_backward"]
