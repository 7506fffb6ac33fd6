"""Forward models: linear operators with exact adjoints, noise, measurements and tasks."""
from .blur import GaussianBlur
from .measurement import Measurement
from .noise import gaussian_noise, randn_like
from ..solvers.linear import batch_dot, batch_norm2, conjugate_gradient
from .operator import LinearOperator
from .tasks import Deblur, Task

__all__ = ["GaussianBlur", "LinearOperator", "Measurement", "Task", "Deblur", "gaussian_noise", "randn_like",
           "batch_dot", "batch_norm2", "conjugate_gradient"]
