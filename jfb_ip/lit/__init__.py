"""Lightning glue: the one module for every method, the callbacks beside it, and the drivers of train.py and
evaluate.py (:mod:`jfb_ip.lit.run`)."""
from .calibration import image_metrics
from .callbacks import ReferenceRows, TestTable, TrainingStats
from .module import ReconstructionModule

__all__ = ["ReconstructionModule", "ReferenceRows", "TestTable", "TrainingStats", "image_metrics"]
