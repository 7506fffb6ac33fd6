"""Forward models: linear operators with exact adjoints, noise, measurements and tasks."""
from .blur import GaussianBlur
from .measurement import Measurement
from .noise import gaussian_noise, randn_like
from .operator import LinearOperator, laplacian
from .tasks import Deblur, Task

__all__ = ["GaussianBlur", "LinearOperator", "Measurement", "Task", "Deblur", "gaussian_noise", "randn_like",
           "laplacian"]
