"""Interval and linear-relaxation domains.

Shapes: an :class:`Interval` of a node holds ``lower``/``upper`` with the node's shape
``(batch, *shape)``; for parameters without a batch dimension, the parameter's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """Element-wise bounds ``lower <= x <= upper``."""

    lower: torch.Tensor
    upper: torch.Tensor

    @staticmethod
    def point(x: torch.Tensor) -> Interval:
        return Interval(x, x)

    @property
    def center(self) -> torch.Tensor:
        return torch.lerp(self.lower, self.upper, 0.5)

    @property
    def radius(self) -> torch.Tensor:
        return (self.upper - self.lower) * 0.5

    def center_radius(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, r)`` with ``[c - r, c + r] = [lower, upper]``, in two tensor operations (IBP reads both for
        every affine layer): ``c = lerp(lower, upper, 1/2) = upper - (upper - lower)/2 <= upper`` and
        ``r = upper - c >= 0`` (infinite ends give infinite ``r``; both infinite, NaN as before)."""
        c = torch.lerp(self.lower, self.upper, 0.5)
        return c, self.upper - c

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape

    def intersect(self, other: Interval) -> Interval:
        """The tighter of two sound intervals (keeps ``lower <= upper`` if both are sound)."""
        return Interval(torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper))

    def map(self, fn) -> Interval:
        """Apply a monotone non-decreasing function to both ends."""
        return Interval(fn(self.lower), fn(self.upper))


@dataclass(frozen=True)
class Relaxation:
    """Linear bounds of an element-wise function ``f`` on an interval ``[l, u]``::

        lw * x + lb  <=  f(x)  <=  uw * x + ub      for all x in [l, u]

    Each field broadcasts against the input's shape ``(batch, *shape)``, or, when the relaxation
    depends on the specification (alpha-CROWN), against ``(batch, spec, *shape)``.
    """

    lw: torch.Tensor
    lb: torch.Tensor
    uw: torch.Tensor
    ub: torch.Tensor
