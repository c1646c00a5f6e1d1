"""Input sets: Lp balls and boxes (more perturbation kinds live beside them)."""

from .lp import Perturbation, PerturbationLpNorm

__all__ = ["Perturbation", "PerturbationLpNorm"]
