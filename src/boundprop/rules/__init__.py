"""Per-operator bound rules, one module per op family, registered by decorators on import.

Importing this package imports every module in it, so a new op family only needs a new file.
"""

import importlib
import pkgutil

from .registry import RULES, OpRules, RelaxCall, Var, is_supported, is_zero, rules_for

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["RULES", "OpRules", "RelaxCall", "Var", "is_supported", "is_zero", "rules_for"]
