"""Numeric settings: a value that is not a finite number is refused in one line before anything runs.

NaN is False under every comparison, so a range check alone (``grad_scale <= 0``) lets it through when it arrives as
a float (the Python API; the CLI's parser happens to refuse the string ``nan`` for some keys only), and infinity
passes every lower bound. Every numeric check runs ``check_finite`` first."""
from __future__ import annotations

import math


def check_finite(**values) -> None:
    """``ValueError`` naming the first of ``values`` (``name=value``) that is NaN or infinite; None (unset) passes."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}: give a number (or leave it unset for "
                             "the default)")


def check_counts(**values) -> None:
    """``ValueError`` naming the first of ``values`` (``name=value``) that is not an integer >= 1 (a bool is not)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_fresh_noise(settings: dict, method: str) -> None:
    """A search that samples whole chains from fresh noise cannot edit an image or optimise only a chain's tail."""
    if settings.get("opt_t") is not None or settings.get("source_image") is not None:
        raise ValueError(f"{method} samples whole chains from fresh noise: drop opt_t and source_image")
