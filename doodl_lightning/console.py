"""What a script that drives Lightning programmatically prints: Lightning's notices that do not concern it, silenced."""
from __future__ import annotations

import logging
import warnings

# notices about set-ups a DOODL run has on purpose: one tick per step (no data loader), frozen models in
# eval mode, a CPU run on a machine with a GPU, and a torch-internal deprecation
IRRELEVANT_WARNINGS = (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*", ".*LeafSpec.*",
                       ".*GPU available but not used.*")


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and the warnings in ``IRRELEVANT_WARNINGS`` (for evaluation scripts
    that run many short fits; the CLI keeps Lightning's own output)."""
    for pattern in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    for name in ("lightning.pytorch", "lightning", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
