"""Where work runs: the device a user names, and the device a model lives on.

Bounds follow their inputs (a model and tensors on CUDA give bounds computed on CUDA); the
verifier, certified training and the command line take a device by name. ``"auto"`` is CUDA when
this machine has it, else the CPU. Code that makes tensors names their device explicitly (that of a
tensor it works with, or ``"cpu"`` for host-side data such as random draws and row indices), so
that it behaves the same whatever ``torch.set_default_device`` says; the tests check this by
running with ``meta`` as the default device. IBP and CROWN-IBP (and the training losses built on
them) also run whole on ``meta`` tensors, which have shapes but no values: proof that they read
nothing on the host and make nothing off their inputs' device (``tests/test_devices.py``).
"""

from __future__ import annotations

from typing import Any

import torch


def resolve_device(device: str | torch.device | None, default: torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`: ``"auto"`` is CUDA when available, else the CPU; None is
    ``default`` (else the CPU). A bare ``"cuda"`` becomes the current CUDA device, so that it compares
    equal to the device of tensors placed there."""
    if device is None:
        return default or torch.device("cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def module_device(model: Any) -> torch.device | None:
    """The device of a module's (or a captured graph's module's) first parameter or buffer; None
    without one."""
    module = getattr(model, "module", None) if not isinstance(model, torch.nn.Module) else model
    if not isinstance(module, torch.nn.Module):
        return None
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


__all__ = ["module_device", "resolve_device"]
