"""Bundled data: a small trained digits classifier and real test images (works offline)."""

from .digits import ARCHITECTURES, BUNDLE_PATH, bundle_info, load_digits_model, load_digits_samples

__all__ = ["ARCHITECTURES", "BUNDLE_PATH", "bundle_info", "load_digits_model", "load_digits_samples"]
