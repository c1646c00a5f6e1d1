"""Input sets: Lp balls and boxes, L0 (a few entries changed), word substitutions, and weight
perturbation by parameter name."""

from .l0 import PerturbationL0Norm
from .lp import Perturbation, PerturbationLpNorm
from .parameters import parameter_leaves, perturb_parameters, sample_parameters
from .synonym import PerturbationSynonym

__all__ = ["Perturbation", "PerturbationL0Norm", "PerturbationLpNorm", "PerturbationSynonym", "parameter_leaves",
           "perturb_parameters", "sample_parameters"]
