"""auto_LiRPA-compatible names (thin layer over the native API)."""

from .auto_lirpa import BoundedModule, BoundedParameter, BoundedTensor, NodeView, check_bound_opts

__all__ = ["BoundedModule", "BoundedParameter", "BoundedTensor", "NodeView", "check_bound_opts"]
