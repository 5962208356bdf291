"""Number options that refuse NaN and infinities (click's FloatRange lets ``nan`` and ``inf`` through:
``nan`` compares false with every bound)."""

from __future__ import annotations

import math

import click


def finite(ctx, param, value):
    """click callback: the option's value must be a finite number (None passes: option not given)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}", ctx=ctx, param=param)
    return value
