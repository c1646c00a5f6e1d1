"""Forward-mode linear bound propagation (placeholder until implemented)."""

from __future__ import annotations

import torch

from .state import PropagationState


def forward_bounds(state: PropagationState, target: str, C: torch.Tensor | None, lower: bool, upper: bool,
                   refine_only: bool = False):
    raise NotImplementedError("forward mode is not implemented yet")
