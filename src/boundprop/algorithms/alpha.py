"""alpha-CROWN (placeholder until implemented)."""

from __future__ import annotations


def alpha_crown(state, target, C, lower, upper, opts):
    raise NotImplementedError("alpha-CROWN is not implemented yet")
