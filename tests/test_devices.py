"""Devices (:mod:`boundprop.devices`): naming them, and that bound computation makes every tensor
on the device of its inputs.

Without a GPU, placement is checked two ways:

* with ``meta`` as the default device: a tensor made without a device becomes a meta tensor, which
  fails as soon as it meets a real one (or is read), as a CPU tensor would fail among CUDA ones;
  the bounds must equal those of a run without it. The verifier, certification and training have
  the same check in their own test files;
* with the model and the input on ``meta`` (shapes, no values): then also a tensor made explicitly
  on the CPU fails where it meets the others, and so does any read of a value on the host except
  the reads by design, which go through ``syncs.to_host`` (it gives ones for meta tensors).
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
from boundprop.zoo import RELU_MODELS, ZOO, build


def _zoo(fast: set[str]) -> list:
    """The zoo's names, those outside ``fast`` marked slow (``make test-all`` runs them)."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in ZOO]


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


@pytest.mark.parametrize("name", _zoo({"mlp", "cnn", "resnet", "transformer", "gelu_layernorm_mlp"}))
def test_bounds_make_every_tensor_on_the_inputs_device(name):
    """Every method on every zoo model, through the auto_LiRPA interface, with a margin specification:
    the same bounds with and without ``meta`` as the default device."""
    model, shape = build(name)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    bm = BoundedModule(model, x)
    bm.set_bound_opts({"optimize_bound_args": {"iteration": 2}})
    out = model(x)
    C = margin_matrix(out.argmax(-1), out.shape[-1]) if out.dim() == 2 else None
    methods = ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN", "forward"]
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


@pytest.mark.parametrize("name", _zoo({"mlp", "cnn", "resnet", "transformer", "bn_pool_cnn"}))
def test_every_method_runs_whole_on_a_device_without_data(name):
    """Every method runs with the model and the input on ``meta``, a device that has shapes but no
    values: every tensor it makes is on the input's device (a CPU tensor would not mix with meta ones,
    as with CUDA ones), and it reads values on the host only through ``syncs.to_host``, the reads by
    design (a meta tensor has no values: any other read fails; ``to_host`` gives ones, i.e. every
    neuron walked, every check passed)."""
    model, shape = build(name)
    graph = capture(model, (torch.rand(2, *shape),))
    model.to("meta")
    x = torch.empty(2, *shape, device="meta")
    methods = ["IBP", "CROWN-IBP", "CROWN", "forward"]
    if name in RELU_MODELS:  # on meta, many ops of curves run through Python reference code: minutes
        methods.append("alpha-CROWN")
    for method in methods:
        with torch.enable_grad() if method == "alpha-CROWN" else torch.no_grad():
            res = compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(eps=0.05)}, method=method,
                                 opts={"optimize_bound_args": {"iteration": 2}})
        assert res.lower.device.type == "meta" and res.lower.shape == res.upper.shape, method


@pytest.mark.parametrize("arch", ["digits_cnn", "resnet", "transformer"])
@pytest.mark.parametrize("method,fusion", [("ibp", False), ("crown-ibp", False), ("crown-ibp", True)])
def test_certified_training_loss_runs_whole_on_a_device_without_data(arch, method, fusion):
    """The robust loss of IBP and CROWN-IBP training, and its gradient, on ``meta``: no host read and
    no tensor off the model's device in a training step's bounds (with and without loss fusion)."""
    from boundprop.training import robust_ce
    from boundprop.training.losses import capture_graphs
    from boundprop.training.models import build_digit_model

    model = build_digit_model(arch, seed=0)
    graphs = capture_graphs(model, torch.rand(4, 1, 8, 8), fusion)
    model.to("meta")
    x, y = torch.empty(4, 1, 8, 8, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    loss = robust_ce(graphs, x, y, 0.05, method, 10, beta=0.5, fusion=fusion)
    loss.sum().backward()
    assert loss.device.type == "meta" and all(p.grad.device.type == "meta" for p in model.parameters())
