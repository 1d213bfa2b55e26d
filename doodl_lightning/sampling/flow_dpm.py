"""DPM-Solver++(2M) on a flow-matching grid (Lu et al. 2022, arXiv 2211.01095, Algorithm 2, multistep second order,
midpoint form), as diffusers' ``DPMSolverMultistepScheduler`` runs it with ``use_flow_sigmas`` and
``prediction_type="flow_prediction"``: SANA's released sampler.

Flow coordinates (x_sigma = (1 - sigma) x_0 + sigma z): alpha = 1 - sigma, lambda = log(alpha / sigma), and the data
prediction is m = x - sigma v(x, t). With h_i = lambda_{i+1} - lambda_i and r_i = h_{i-1} / h_i:

    first order  (step 0):  x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) m_i
    second order (others):  ... - alpha_{i+1} (e^{-h_i} - 1) [m_i + (m_i - m_{i-1}) / (2 r_i)]
    last step (sigma = 0):  x_n = m_{n-1}   (the scheduler's first-order final step onto sigma 0)

so every step is linear, x_{i+1} = a_i x_i + b_i m(x_i) + c_i m(x_{i-1}), and the ``checkpoint`` gradient keeps one
latent per step: in backward, step i's data prediction is recomputed with grad and its VJP takes the cotangent
b_i g_{i+1} + c_{i+1} g_{i+2} (it feeds two steps), g_i = a_i g_{i+1} + that VJP.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..precision import autocast_state, restored_autocast
from .chains import cotangent_scaled, vjp
from .flow import FlowSchedule, Velocity
from .registry import Sampler, register_sampler


def dpm_coefficients(schedule: FlowSchedule) -> list[tuple[float, float, float]]:
    """(a_i, b_i, c_i) of x_{i+1} = a_i x_i + b_i m_i + c_i m_{i-1} for each step (python floats)."""
    s = schedule.sigmas
    # lambda = log(alpha / sigma): -inf at sigma = 1 (the step from it is then Euler's), +inf at sigma = 0
    lam = [-math.inf if v >= 1.0 else math.log((1.0 - v) / v) if v > 0 else math.inf for v in s]
    out = []
    for i in range(len(schedule)):
        if s[i + 1] == 0.0:  # onto sigma = 0: the data prediction itself
            out.append((0.0, 1.0, 0.0))
            continue
        h = lam[i + 1] - lam[i]
        a, phi = s[i + 1] / s[i], -(1.0 - s[i + 1]) * math.expm1(-h)  # -alpha' (e^{-h} - 1)
        if i == 0:  # 1. first order: no previous data prediction yet
            out.append((a, phi, 0.0))
        else:  # 2. second order (midpoint): D0 = m_i, D1 = (m_i - m_{i-1}) / r, x' = a x + phi (D0 + D1 / 2)
            r = (lam[i] - lam[i - 1]) / h
            out.append((a, phi * (1.0 + 0.5 / r), -phi * 0.5 / r))
    return out


def data_prediction(velocity: Velocity, x: Tensor, schedule: FlowSchedule, i: int) -> Tensor:
    """m = x - sigma_i v(x, t_i): the flow model's x_0 (convert_model_output for flow_prediction)."""
    return x - schedule.sigmas[i] * velocity(x, schedule.timesteps[i]).to(x.dtype)


def sample_flow_dpm(velocity: Velocity, x: Tensor, schedule: FlowSchedule) -> Tensor:
    """DPM-Solver++(2M) from x_{sigma_0} to x_0 on the flow grid (SanaPipeline's DPMSolverMultistepScheduler)."""
    m_prev = None
    for i, (a, b, c) in enumerate(dpm_coefficients(schedule)):
        m = data_prediction(velocity, x, schedule, i)
        x = a * x + b * m + (c * m_prev if c else 0.0) if a else b * m
        m_prev = m
    return x


class DPMCheckpoint(torch.autograd.Function):
    """The multistep chain with one latent kept per step (module docstring): ``DPMCheckpoint.apply(x, velocity,
    schedule)``."""

    @staticmethod
    def forward(ctx, x, velocity, schedule):
        coef = dpm_coefficients(schedule)
        xs, m_prev = [x], None
        for i, (a, b, c) in enumerate(coef):
            m = data_prediction(velocity, xs[-1], schedule, i)
            xs.append(a * xs[-1] + b * m + (c * m_prev if c else 0.0) if a else b * m)
            m_prev = m
        ctx.save_for_backward(*xs[:-1])  # one latent per step: the whole memory cost
        ctx.velocity, ctx.schedule, ctx.coef, ctx.autocast = velocity, schedule, coef, autocast_state(x.device.type)
        return xs[-1]

    @staticmethod
    def backward(ctx, g):
        xs, coef = ctx.saved_tensors, ctx.coef
        n = len(coef)
        g_next, g_next2 = g, None  # dL/dx_{i+1}, dL/dx_{i+2}
        with restored_autocast(ctx.autocast):
            for i in reversed(range(n)):
                a, b, _ = coef[i]
                # m_i feeds x_{i+1} (b_i) and x_{i+2} (c_{i+1})
                cot = b * g_next + (coef[i + 1][2] * g_next2 if i + 1 < n and coef[i + 1][2] else 0.0)
                xi = xs[i].detach().requires_grad_()
                with torch.enable_grad():
                    m = data_prediction(ctx.velocity, xi, ctx.schedule, i)
                (gm,) = vjp((m,), (xi,), (cot,))
                g_next, g_next2 = (a * g_next + gm if a else gm), g_next
        return g_next, None, None


@register_sampler
class FlowDPM(Sampler):
    """``flow_dpm``: DPM-Solver++(2M) multistep steps on the flow grid (one velocity call per step, as diffusers'
    DPMSolverMultistepScheduler with flow sigmas: SANA's); one latent; not invertible."""

    name, schedule_type = "flow_dpm", FlowSchedule
    paper = "Lu et al. 2022, DPM-Solver++ (2M, midpoint), on flow sigmas as SANA samples"

    def sample(self, model, x, schedule, *, y=None, mix_weight=0.93, noises=None):
        return (sample_flow_dpm(model, x, schedule),)

    def differentiable(self, model, x, schedule, backprop, *, y=None, mix_weight=0.93, noises=None,
                       drift_tolerance=1e-3, info=None):
        if backprop == "autograd":
            return (cotangent_scaled(lambda x: sample_flow_dpm(model, x, schedule), x),)
        return (DPMCheckpoint.apply(x, model, schedule),)
