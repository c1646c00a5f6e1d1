"""Immutable bound objects exchanged between rules and algorithms."""

from .interval import Interval, Relaxation

__all__ = ["Interval", "Relaxation"]
