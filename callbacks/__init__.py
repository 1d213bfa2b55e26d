"""Callbacks around the optimisation: early stopping, images, results."""
from .early_stopping import ItemEarlyStopping
from .image_logger import ImageLogger
from .results import ResultsWriter

__all__ = ["ImageLogger", "ItemEarlyStopping", "ResultsWriter"]
