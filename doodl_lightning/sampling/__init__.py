"""Samplers and their gradients, in plain torch: every sampler takes an eps(x, t) callable."""
from .backprop import BACKPROPS, SAMPLERS, ReversibleDriftWarning, check_sampler, sample
from .ddim import ddim_step, sample_ddim
from .denoiser import Denoiser, Eps, check_guidance_scale
from .edict import (Inversion, check_mix_weight, edict_invert, edict_step, edict_step_inverse, mix, relative_error,
                    sample_edict, unmix)
from .one_step import GuidedEps, OneStepGradient
from .schedule import GRIDS, Schedule, check_steps

__all__ = [
    "BACKPROPS", "GRIDS", "SAMPLERS", "Denoiser", "Eps", "GuidedEps", "Inversion", "OneStepGradient", "ReversibleDriftWarning",
    "Schedule", "check_guidance_scale", "check_mix_weight", "check_sampler", "check_steps", "ddim_step", "edict_invert",
    "edict_step", "edict_step_inverse", "mix",
    "relative_error", "sample", "sample_ddim", "sample_edict", "unmix",
]
