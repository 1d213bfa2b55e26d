"""Callbacks around the optimisation: renormalisation, early stopping, images, results."""
from .early_stopping import ItemEarlyStopping
from .image_logger import ImageLogger
from .renormalize import LatentRenormalization
from .results import ResultsWriter

__all__ = ["ImageLogger", "ItemEarlyStopping", "LatentRenormalization", "ResultsWriter"]
