"""The sampler registry: every sampler is a ``Sampler`` registered under its YAML name (``model.sampler``).

One signature for all, after k-diffusion's ``sample_euler(model, x, sigmas, ...)``: a sampler takes the
model (an ``eps(x, t)`` or ``velocity(x, t)`` callable), the initial latent x and its schedule, plus the
keyword-only extras that some samplers read and the others ignore (``y``: EDICT's second latent; ``mix_weight``;
``noises``: the per-step noise LCM re-injects). It returns the final latents as a tuple, one per latent it carries.

Adding a sampler = one file that subclasses ``Sampler`` under ``@register_sampler`` + one import line in
``sampling/__init__.py``; ``tests/test_sampler_contract.py`` then runs the shared contract on it.
"""
from __future__ import annotations

from typing import Callable, ClassVar

from torch import Tensor

BACKPROPS = ("autograd", "checkpoint", "reversible")
SAMPLERS: dict[str, "Sampler"] = {}  # name -> the sampler (one instance: samplers hold no state)


class Sampler:
    """A deterministic sampler of a diffusion / flow chain, and the gradient of its final latents w.r.t. x_T.

    Class attributes a sampler declares:
        name: its YAML name. schedule_type: the schedule it runs on (``Schedule`` or ``FlowSchedule``).
        latents: 1, or 2 for a coupled pair (x, y) (EDICT). invertible: exactly invertible, so the ``reversible``
        gradient and editing (inverting a source image) are available. paper: the algorithm it implements.
        renoises: it adds fresh noise between steps (consistency samplers): the chain hands it ``noises`` fixed per
        (seed, step), so the chain stays a deterministic function of x_T, as its pipeline's with those draws.
    """

    name: ClassVar[str]
    schedule_type: ClassVar[type]
    latents: ClassVar[int] = 1
    invertible: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    renoises: ClassVar[bool] = False

    def sample(self, model: Callable, x: Tensor, schedule, *, y: Tensor | None = None, mix_weight: float = 0.93,
               noises: list[Tensor] | None = None) -> tuple[Tensor, ...]:
        """The final latents from x (and y), without the gradient machinery (autograd still records it if on)."""
        raise NotImplementedError

    def differentiable(self, model: Callable, x: Tensor, schedule, backprop: str, *, y: Tensor | None = None,
                       mix_weight: float = 0.93, noises: list[Tensor] | None = None, drift_tolerance: float = 1e-3,
                       info: dict | None = None) -> tuple[Tensor, ...]:
        """The final latents with a chain gradient: ``autograd``, ``checkpoint`` or (invertible) ``reversible``."""
        raise NotImplementedError

    def invert(self, model: Callable, x0: Tensor, schedule, mix_weight: float = 0.93):
        """(invertible samplers) the pair that samples back to the clean latent x0: an ``edict.Inversion``."""
        raise ValueError(f"sampler {self.name!r} is not exactly invertible; editing needs an invertible sampler "
                         f"({', '.join(n for n, s in SAMPLERS.items() if s.invertible)})")

    def __repr__(self) -> str:
        return f"<sampler {self.name}>"


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: register ``cls`` under ``cls.name`` (one instance)."""
    if cls.name in SAMPLERS:
        raise ValueError(f"sampler {cls.name!r} is registered twice ({type(SAMPLERS[cls.name]).__name__}, {cls.__name__})")
    SAMPLERS[cls.name] = cls()
    return cls


def get_sampler(name: str) -> Sampler:
    """The registered sampler ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_sampler(sampler: str, backprop: str, first_image_only: bool = False) -> Sampler:
    """One-line errors for a sampler / backprop pair (and ``optimize_first_edict_image_only``); the sampler."""
    s = get_sampler(sampler)
    if first_image_only and s.latents != 2:
        raise ValueError(f"optimize_first_edict_image_only needs a coupled sampler "
                         f"({', '.join(n for n, v in SAMPLERS.items() if v.latents == 2)}; {sampler} makes one image)")
    if backprop not in BACKPROPS:
        raise ValueError(f"unknown backprop {backprop!r}; choose one of {', '.join(BACKPROPS)}")
    if backprop == "reversible" and not s.invertible:
        raise ValueError(f"backprop 'reversible' needs an exactly invertible sampler "
                         f"({', '.join(n for n, v in SAMPLERS.items() if v.invertible)}; {sampler} is not); "
                         f"use 'checkpoint' or 'autograd' with '{sampler}'")
    return s
