"""Stable Diffusion 1.x's noise schedule, the one place it is spelt, and sd-shapes' version of it.

``SD1_SCHEDULER_CONFIG`` is the released SD-1.x ``scheduler_config.json`` (SD-2.x keeps it; the shapes world
trains with it). Scheduler classes take what they know of it (``from_config``), so PNDM ignores ``clip_sample``.
It lives here, not in ``doodl_lightning.testing``, because the shapes world trains with it and the core never
imports ``testing``; ``testing.architectures`` builds its random-weight SD architectures from this one."""
from __future__ import annotations

__all__ = ["SD1_SCHEDULER_CONFIG", "SD_SCHEDULER_CONFIG"]

SD1_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
# Stable Diffusion 1.x's noise schedule, predicting the noise: sd-shapes' scheduler
SD_SCHEDULER_CONFIG = dict(SD1_SCHEDULER_CONFIG, prediction_type="epsilon")
