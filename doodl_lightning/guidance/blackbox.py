"""Black-box rewards: any Python callable that scores images (a VLM judge, a JPEG size, an OCR check), no gradient."""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .base import Guidance

__all__ = ["BlackBoxReward", "is_black_box", "resolve_dotted"]


def is_black_box(g: nn.Module) -> bool:
    """Whether a guidance module has no gradient (``BlackBoxReward``): a method must estimate its gradient otherwise
    (``zeroth_order.DNO``) or only compare its values (best-of-N, zero-order search)."""
    return not getattr(g, "differentiable", True)


def resolve_dotted(path: str, owner: str) -> Any:
    """The object a dotted name names (``package.module.function``, ``package.module.Class``, also nested attributes):
    the longest prefix that imports as a module, then attributes of it. One-line errors name the path and the fix."""
    if not isinstance(path, str) or not path or any(not part.isidentifier() for part in path.split(".")):
        raise ValueError(f"{owner}: reward must be a dotted name such as 'package.module.function', got {path!r}")
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # only "this prefix is not a module" moves on to a shorter prefix; a module that exists but fails to
            # import (a missing dependency inside it) is its own error, reported as such
            if e.name is not None and module_name.startswith(e.name) and (e.name == module_name or cut > 1):
                continue
            raise ValueError(f"{owner}: importing {module_name} for reward {path!r} failed: {e}") from None
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise ValueError(f"{owner}: {'.'.join(parts[:cut])} has no {attr!r} (reward {path!r}): check the "
                                 f"name, or give the callable's full dotted path") from None
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f"{owner}: no module of {path!r} can be imported: give the dotted path of an importable "
                     f"callable (its package installed, or on PYTHONPATH)")


def _accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (by name, or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: images only
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class BlackBoxReward(Guidance):
    """A guidance term with no gradient: ``reward(images, prompts=..., generators=...) -> N numbers`` for any Python
    callable (DNO, Tang et al. ICML 2025, "Inference-time alignment of diffusion models with direct noise
    optimization", Sec. 5: non-differentiable rewards such as JPEG compressibility; their gradient is estimated
    from the reward's values alone, ``zeroth_order.DNO``).

    YAML keys:
        reward: the dotted name of a function (``package.module.score``) or of a class (``package.module.Judge``,
            instantiated once with ``reward_args`` as keyword arguments; its instances are the callable). From Python,
            the callable itself may be given.
        reward_args: keyword arguments of the class, or bound to the function (``functools.partial``).
        maximize: true (default): the callable returns a reward, higher is better (loss = -reward); false: a loss.
        weight, name: as for every guidance term.

    The callable receives the images (N, 3, H, W) in [-1, 1], detached, on the images' device, and ``prompts`` (the
    items' prompts) and ``generators`` (one CPU generator per item, from the search's per-item stream: a judge that
    samples draws from them, so its verdicts repeat and do not depend on the batch) when its signature takes them.
    It must return one finite number per image (a tensor, array or list of shape (N,)); anything else is refused in
    one line. A callable that is an ``nn.Module`` becomes a frozen submodule (moved with the search, left out of its
    checkpoints, as every guidance model).

    It is called under ``torch.no_grad``; called on images that carry a graph (a method back-propagating through it,
    such as DOODL) it refuses, since the gradient it would give is silently zero.
    """

    default_name = "blackbox"
    differentiable = False  # read by ``is_black_box``

    def __init__(self, reward: str | Callable[..., Any], reward_args: dict | None = None, maximize: bool = True,
                 weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        if reward_args is not None and not isinstance(reward_args, dict):
            raise ValueError(f"{self.name}: reward_args must be a mapping of keyword arguments, got "
                             f"{type(reward_args).__name__}")
        self.what = reward if isinstance(reward, str) else getattr(reward, "__qualname__", type(reward).__name__)
        obj = resolve_dotted(reward, self.name) if isinstance(reward, str) else reward
        if inspect.isclass(obj):
            try:
                obj = obj(**(reward_args or {}))
            except TypeError as e:
                raise ValueError(f"{self.name}: {self.what}(**reward_args) failed: {e}; give the class's arguments "
                                 f"under reward_args") from None
        elif reward_args:
            if not callable(obj):
                raise ValueError(f"{self.name}: reward {self.what!r} is a {type(obj).__name__}, not a callable: give "
                                 f"a function or a class")
            obj = functools.partial(obj, **reward_args)
        if not callable(obj):
            raise ValueError(f"{self.name}: reward {self.what!r} is a {type(obj).__name__}, not a callable: give a "
                             f"function, a class whose instances are callable, or a callable object")
        self.reward = obj  # an nn.Module is registered as a submodule, anything else kept as an attribute
        base = obj.func if isinstance(obj, functools.partial) else obj
        base = base.forward if isinstance(base, nn.Module) else base  # a module's __call__ takes anything
        self.passes = {k: _accepts(base, k) for k in ("prompts", "generators")}
        self.sign = -1.0 if maximize else 1.0
        self.freeze()

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None,
                generators: Sequence[torch.Generator] | None = None, latents: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled() and images.requires_grad:
            raise ValueError(f"{self.name} (BlackBoxReward) has no gradient, but this method back-propagates through "
                             f"its guidance: optimise it with doodl_lightning.zeroth_order.DNO, or a gradient-free "
                             f"search (best_of_n.BestOfN, zero_order.ZeroOrderSearch)")
        with torch.no_grad():
            return super().forward(images.detach(), prompts, generators, latents)

    def loss(self, images: Tensor, prompts: Sequence[str] | None,
             generators: Sequence[torch.Generator] | None) -> Tensor:
        """(N,) ``sign`` x the callable's scores (float32, on the images' device), each checked."""
        kwargs = {"prompts": prompts, "generators": generators}
        out = self.reward(images, **{k: v for k, v in kwargs.items() if self.passes[k]})
        return self.sign * self.scores(out, len(images)).to(images.device)

    def scores(self, out: Any, n: int) -> Tensor:
        """The callable's return value as a float32 tensor (n,), or a one-line error naming what is wrong."""
        try:
            t = torch.as_tensor(out.detach() if isinstance(out, Tensor) else out, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{self.name}: reward {self.what} returned a {type(out).__name__}, not numbers: return "
                             f"one number per image (a tensor, array or list of shape ({n},))") from None
        if tuple(t.shape) != (n,):
            raise ValueError(f"{self.name}: reward {self.what} returned shape {tuple(t.shape)} for {n} images: "
                             f"return one number per image, shape ({n},)")
        bad = (~torch.isfinite(t)).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise ValueError(f"{self.name}: reward {self.what} returned {float(t[i])} for image {i}: return a finite "
                             f"score for every image (map a failure to a number, e.g. the worst score)")
        return t.float()

    def extra_repr(self) -> str:
        return f"reward={self.what!r}, maximize={self.sign < 0}, " + super().extra_repr()
