"""What a user sees: the library notices that do not concern a DOODL run, silenced at one place."""
from __future__ import annotations

import logging
import warnings

# notices about set-ups a DOODL run has on purpose: one tick per step (no data loader), frozen models in
# eval mode, a CPU run on a machine with a GPU, checkpoints taken after the update (what resuming needs:
# tests/test_framework.py), and a torch-internal deprecation inside Lightning
IRRELEVANT_WARNINGS = (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*", ".*LeafSpec.*",
                       ".*GPU available but not used.*", ".*ModelCheckpoint with manual optimization.*")


def silence_irrelevant() -> None:
    """Filter the warnings in ``IRRELEVANT_WARNINGS`` and the model-loading progress bars of diffusers and
    transformers (loading takes a second or two; the bars fill the screen before the first step)."""
    for pattern in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def quiet_lightning() -> None:
    """``silence_irrelevant`` plus Lightning's start-up banners (for evaluation scripts that run many short
    fits; the CLI keeps Lightning's own output)."""
    silence_irrelevant()
    for name in ("lightning.pytorch", "lightning", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
