"""Click types of the numeric options: click checks the range, so a bad value is a usage error naming the option.

Example:
    >>> POSITIVE.convert("0.05", None, None)
    0.05
"""

from __future__ import annotations

import math

import click

__all__ = ["FiniteFloatRange", "POSITIVE_INT", "NON_NEGATIVE_INT", "POSITIVE", "NON_NEGATIVE", "OPEN_FRACTION",
           "FRACTION", "LEARNING_RATE"]


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and inf (FloatRange lets nan through: no comparison holds)."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)
POSITIVE = FiniteFloatRange(min=0, min_open=True)
NON_NEGATIVE = FiniteFloatRange(min=0)
OPEN_FRACTION = FiniteFloatRange(0, 1, min_open=True, max_open=True)  # (0, 1): sparsity
FRACTION = FiniteFloatRange(0, 1, min_open=True)  # (0, 1]: alpha, t_end_fraction
# (0, float32's largest]: the optimizer scales float32 gradients by it (a larger one failed inside torch)
LEARNING_RATE = FiniteFloatRange(min=0, max=3.4028234663852886e38, min_open=True)
