"""Callbacks around the optimisation: latent renormalisation, early stopping, images, results, the progress bar, TensorBoard's summary."""
from .compute import ComputeMeter
from .early_stopping import ItemEarlyStopping
from .image_logger import ImageLogger
from .progress import DefaultProgressBar, StepProgressBar
from .renormalize import RenormalizeLatents
from .results import ResultsWriter
from .tensorboard import TensorBoardSummary

__all__ = ["ComputeMeter", "DefaultProgressBar", "ImageLogger", "ItemEarlyStopping", "RenormalizeLatents", "ResultsWriter", "StepProgressBar",
           "TensorBoardSummary"]
