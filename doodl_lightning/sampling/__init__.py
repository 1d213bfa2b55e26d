"""Samplers and their gradients, in plain torch: every sampler takes an eps(x, t) (or velocity) callable.

The registry (``registry.SAMPLERS``) is filled by the sampler modules imported below, one line each.
"""
from .registry import BACKPROPS, SAMPLERS, Sampler, check_sampler, get_sampler, register_sampler
from .ddim import DDIM, ddim_step, sample_ddim
from .edict import (EDICT, Inversion, ReversibleDriftWarning, check_mix_weight, edict_invert, edict_step,
                    edict_step_inverse, mix, relative_error, sample_edict, unmix)
from .lcm import LCM, lcm_step, sample_lcm
from .flow import (FLOW_BACKPROPS, FlowEuler, FlowSchedule, Velocity, flow_euler_step, flow_shift_mu, flux_sigmas,
                   sample_flow, sample_flow_differentiable)
from .flow_edict import (FlowEDICT, flow_edict_invert, flow_edict_step, flow_edict_step_inverse, sample_flow_edict,
                         sample_flow_edict_differentiable)
from .scm import SCM, sample_scm, scm_step  # noqa: F401 - registers the sampler
from .flow_dpm import FlowDPM, sample_flow_dpm  # noqa: F401 - registers the sampler
from .backprop import sample
from .chains import cotangent_scaled
from .denoiser import Control, Denoiser, Eps, check_guidance_scale
from .one_step import GuidedEps, OneStepGradient
from .schedule import GRIDS, Schedule, check_steps, default_grid

__all__ = [
    "BACKPROPS", "GRIDS", "SAMPLERS", "Control", "DDIM", "Denoiser", "EDICT", "Eps", "FLOW_BACKPROPS", "FlowEDICT",
    "FlowEuler", "FlowSchedule", "GuidedEps", "Inversion", "LCM", "OneStepGradient", "ReversibleDriftWarning",
    "Sampler", "Schedule", "Velocity", "check_guidance_scale", "check_mix_weight", "check_sampler", "check_steps",
    "cotangent_scaled", "ddim_step", "default_grid", "edict_invert", "edict_step", "edict_step_inverse",
    "flow_edict_invert", "flow_edict_step", "flow_edict_step_inverse", "flow_euler_step", "flow_shift_mu",
    "flux_sigmas", "get_sampler", "lcm_step", "mix", "register_sampler", "relative_error", "sample", "sample_ddim",
    "sample_edict", "sample_flow", "sample_flow_differentiable", "sample_flow_edict", "sample_flow_edict_differentiable",
    "sample_lcm", "unmix",
]
