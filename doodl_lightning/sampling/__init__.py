"""Samplers and their gradients, in plain torch: every sampler takes an eps(x, t) callable."""
from .backprop import BACKPROPS, SAMPLERS, ReversibleDriftWarning, check_sampler, sample
from .ddim import ddim_step, sample_ddim
from .denoiser import Control, Denoiser, Eps, check_guidance_scale
from .edict import (Inversion, check_mix_weight, edict_invert, edict_step, edict_step_inverse, mix, relative_error,
                    sample_edict, unmix)
from .lcm import lcm_step, sample_lcm
from .flow import (FLOW_BACKPROPS, FlowSchedule, Velocity, flow_edict_invert, flow_edict_step, flow_edict_step_inverse,
                   flow_euler_step, flow_shift_mu, flux_sigmas, sample_flow, sample_flow_differentiable, sample_flow_edict,
                   sample_flow_edict_differentiable)
from .one_step import GuidedEps, OneStepGradient
from .schedule import GRIDS, Schedule, check_steps, default_grid

__all__ = [
    "BACKPROPS", "GRIDS", "SAMPLERS", "Control", "Denoiser", "default_grid", "lcm_step", "sample_lcm", "Eps", "GuidedEps", "Inversion", "OneStepGradient", "ReversibleDriftWarning",
    "Schedule", "check_guidance_scale", "check_mix_weight", "check_sampler", "check_steps", "ddim_step", "edict_invert",
    "edict_step", "edict_step_inverse", "mix",
    "relative_error", "sample", "sample_ddim", "sample_edict", "unmix",
    "FLOW_BACKPROPS", "FlowSchedule", "Velocity", "flow_edict_invert", "flow_edict_step", "flow_edict_step_inverse",
    "flow_euler_step", "flow_shift_mu", "flux_sigmas", "sample_flow", "sample_flow_differentiable", "sample_flow_edict",
    "sample_flow_edict_differentiable",
]
