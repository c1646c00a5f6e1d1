"""Devices (:mod:`boundprop.devices`): naming them, and that bound computation makes every tensor
on the device of its inputs.

Without a GPU, placement is checked with ``meta`` as the default device: a tensor made without a
device becomes a meta tensor, which fails as soon as it meets a real one (or is read), as a CPU
tensor would fail among CUDA ones. The verifier and training have the same check in their own test
files.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from boundprop import BoundedModule, BoundedTensor, PerturbationL0Norm, PerturbationLpNorm, capture, compute_bounds
from boundprop.devices import module_device, resolve_device
from boundprop.perturbation import perturb_parameters
from boundprop.spec import margin_matrix
from boundprop.zoo import ZOO, build

#: methods per model: forward mode has no rule for these models' attention, LayerNorm and max pooling
_NO_FORWARD = {"transformer", "gelu_layernorm_mlp", "bn_pool_cnn"}


def test_resolve_device():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(None, torch.device("meta")) == torch.device("meta")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == torch.zeros(1, device="cuda").device
    with pytest.raises(RuntimeError):
        resolve_device("no-such-device")


def test_module_device():
    model = nn.Linear(2, 1)
    assert module_device(model) == torch.device("cpu")
    assert module_device(capture(model, (torch.zeros(1, 2),))) == torch.device("cpu")
    assert module_device(nn.ReLU()) is None and module_device("model.onnx") is None


def _bounds_on_meta_default(fn):
    with torch.device("meta"):
        lower, upper = fn()
    assert lower.device.type == "cpu" and upper.device.type == "cpu"
    return lower, upper


@pytest.mark.parametrize("name", list(ZOO))
def test_bounds_make_every_tensor_on_the_inputs_device(name):
    """Every method on every zoo model, through the auto_LiRPA interface, with a margin specification:
    the same bounds with and without ``meta`` as the default device."""
    model, shape = build(name)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    bm = BoundedModule(model, x)
    bm.set_bound_opts({"optimize_bound_args": {"iteration": 2}})
    out = model(x)
    C = margin_matrix(out.argmax(-1), out.shape[-1]) if out.dim() == 2 else None
    methods = ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"] + ([] if name in _NO_FORWARD else ["forward"])
    for method in methods:
        def run(method=method):
            return bm.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(eps=0.05)),), method=method, C=C)

        want = run()
        got = _bounds_on_meta_default(run)
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} {method}")


@pytest.mark.parametrize("case", ["l1", "l2", "l0", "clipped box", "weights linf", "weights l2"])
def test_other_perturbations_make_every_tensor_on_the_inputs_device(case):
    torch.manual_seed(0)
    if case.startswith("weights"):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
        x = torch.rand(3, 6)
        g = capture(model, (x,))
        ptbs = (perturb_parameters(g, {"0.weight": 0.1, "*.bias": 0.01}) if case == "weights linf"
                else perturb_parameters(g, {"0.weight": 0.1}, norm=2))
    else:
        model, shape = build("cnn")
        x = torch.rand(3, *shape)
        g = capture(model, (x,))
        ptb = {"l1": PerturbationLpNorm(eps=0.5, norm=1), "l2": PerturbationLpNorm(eps=0.1, norm=2),
               "l0": PerturbationL0Norm(eps=2),
               "clipped box": PerturbationLpNorm(eps=0.05, norm=math.inf, x_L=(x - 0.05).clamp_min(0),
                                                 x_U=(x + 0.05).clamp_max(1))}[case]
        ptbs = {g.inputs[0]: ptb}
    for method in ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"):
        def run(method=method):
            res = compute_bounds(g, (x,), ptbs, method=method, opts={"optimize_bound_args": {"iteration": 2}})
            return res.lower, res.upper

        for a, b in zip(run(), _bounds_on_meta_default(run)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{case} {method}")
