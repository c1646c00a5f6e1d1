"""Graph walks: IBP, backward (CROWN), forward mode, alpha-CROWN, behind one call shape."""

from .run import BoundResult, canonical_method, compute_bounds

__all__ = ["BoundResult", "canonical_method", "compute_bounds"]
