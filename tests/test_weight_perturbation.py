"""Weight perturbation: bounds under perturbed Linear, Conv and BatchNorm parameters (and inputs).

Soundness is checked by sampling parameters (and inputs) in their boxes, vertices included, and
evaluating the model with ``torch.func.functional_call``; where the output is linear in the
perturbed parameters (constant input, one layer) CROWN must be exact.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import boundprop
from boundprop import BoundedModule, BoundedParameter, BoundedTensor, PerturbationLpNorm, compute_bounds
from boundprop.perturbation import perturb_parameters, sample_parameters
from boundprop.rules.perturbed_weights import conv_weight_coefficient

METHODS = ("IBP", "CROWN-IBP", "CROWN")
ROOT = Path(__file__).resolve().parents[1]


def _bn(n: int, gen: torch.Generator, dims: int = 2) -> nn.Module:
    bn = nn.BatchNorm2d(n) if dims == 2 else nn.BatchNorm1d(n)
    with torch.no_grad():
        bn.running_mean.copy_((torch.rand(n, generator=gen) - 0.5) * 0.4)
        bn.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        bn.weight.copy_((torch.rand(n, generator=gen) - 0.3) * 1.5)  # some negative scales
        bn.bias.copy_((torch.rand(n, generator=gen) - 0.5) * 0.2)
    return bn


def conv2d_net() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), _bn(4, gen), nn.ReLU(),
                         nn.Conv2d(4, 4, 2, groups=2, dilation=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 3)).eval()


def conv1d_net() -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, dilation=2), _bn(3, gen, 1), nn.ReLU(),
                         nn.Conv1d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(2 * 3, 2)).eval()


def mlp_net() -> nn.Module:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), _bn(6, gen, 1), nn.ReLU(),
                         nn.Linear(6, 3)).eval()


@pytest.fixture(scope="module")
def nets():
    """One capture per architecture, shared by the tests of this file."""
    out = {}
    for name, make, shape in (("conv2d", conv2d_net, (2, 2, 6, 6)), ("conv1d", conv1d_net, (2, 2, 7)),
                              ("mlp", mlp_net, (3, 5))):
        model = make()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        out[name] = (model, x, boundprop.capture(model, x))
    return out


def check_sampled(model, x, g, ptbs, results, n: int = 100, seed: int = 0, tol: float = 1e-5):
    """Every result must contain the outputs at sampled parameters/inputs (half of them vertices)."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    x_ptb = ptbs.get(g.inputs[0])
    box = x_ptb.interval(x) if x_ptb is not None else None
    with torch.no_grad():
        for i in range(n):
            corner = i % 2 == 0
            sample = sample_parameters(g, ptbs, gen, corners=corner)
            xi = x
            if box is not None:
                u = torch.rand(x.shape, generator=gen)
                xi = box.lower + (u.round() if corner else u) * (box.upper - box.lower)
            y = torch.func.functional_call(model, {**params, **sample}, (xi,))
            for method, r in results.items():
                slack = tol * (1 + y.abs())
                assert (r.lower <= y + slack).all(), (method, float((r.lower - y).max()))
                assert (r.upper >= y - slack).all(), (method, float((y - r.upper).max()))


CASES = [  # (net, perturbed parameters, input perturbed)
    ("conv2d", ("0.weight",), False),
    ("conv2d", ("0.weight", "0.bias"), False),
    ("conv2d", ("0.weight",), True),
    ("conv2d", ("3.weight", "3.bias", "6.weight"), True),
    ("conv2d", ("1.weight", "1.bias"), False),
    ("conv2d", ("1.weight", "0.weight"), True),
    ("conv2d", ("0.bias", "1.bias"), True),
    ("conv2d", ("0.bias",), False),
    ("conv2d", ("1.bias", "3.bias"), False),
    ("conv1d", ("0.weight", "3.weight"), False),
    ("conv1d", ("0.weight", "1.weight", "3.bias"), True),
    ("mlp", ("0.weight",), False),
    ("mlp", ("0.weight", "0.bias", "2.weight"), False),
    ("mlp", ("0.weight", "2.weight", "5.weight"), True),
    ("mlp", ("3.weight", "3.bias"), True),
    ("mlp", ("3.bias",), False),
    ("mlp", ("0.bias",), False),  # only a bias of a layer fed by the fixed input: x W^T is a constant term
    ("mlp", ("0.bias", "2.bias"), False),
]


@pytest.mark.parametrize("net,names,with_x", CASES)
def test_weight_perturbation_sound(nets, net, names, with_x):
    model, x, g = nets[net]
    ptbs = perturb_parameters(g, {n: 0.05 for n in names})
    if with_x:
        ptbs[g.inputs[0]] = PerturbationLpNorm(0.05)
    results = {m: compute_bounds(g, (x,), ptbs, method=m) for m in METHODS}
    check_sampled(model, x, g, ptbs, results)
    ibp, crown = results["IBP"], results["CROWN"]
    assert torch.isfinite(crown.lower).all() and torch.isfinite(crown.upper).all()
    assert (crown.lower >= ibp.lower - 1e-5).all() and (crown.upper <= ibp.upper + 1e-5).all()
    assert float((crown.upper - crown.lower).mean()) <= float((ibp.upper - ibp.lower).mean()) + 1e-6


@pytest.mark.parametrize("net", ["conv2d", "mlp"])
def test_alpha_crown_with_weight_perturbation(nets, net):
    model, x, g = nets[net]
    ptbs = perturb_parameters(g, {"0.weight": 0.05, "*.bias": 0.02})
    ptbs[g.inputs[0]] = PerturbationLpNorm(0.05)
    crown = compute_bounds(g, (x,), ptbs, method="CROWN")
    alpha = compute_bounds(g, (x,), ptbs, method="alpha-CROWN", opts={"optimize_bound_args": {"iteration": 5}})
    check_sampled(model, x, g, ptbs, {"alpha-CROWN": alpha}, n=60)
    assert float((alpha.upper - alpha.lower).mean()) <= float((crown.upper - crown.lower).mean()) + 1e-5
    with pytest.raises(NotImplementedError, match="forward mode"):
        compute_bounds(g, (x,), ptbs, method="forward")


def test_relative_perturbation_sound_and_scales(nets):
    model, x, g = nets["conv2d"]
    ptbs = perturb_parameters(g, {"*.weight": 0.02}, relative=True)
    assert len(ptbs) == 4
    results = {m: compute_bounds(g, (x,), ptbs, method=m) for m in METHODS}
    check_sampled(model, x, g, ptbs, results)
    half = compute_bounds(g, (x,), perturb_parameters(g, {"*.weight": 0.01}, relative=True), method="CROWN")
    assert float((half.upper - half.lower).mean()) < float((results["CROWN"].upper - results["CROWN"].lower).mean())


@pytest.mark.parametrize("net,name", [("conv2d", "0.weight"), ("conv1d", "0.weight"), ("conv2d", "3.weight"),
                                      ("conv2d", "0.bias")])
def test_conv_parameter_only_crown_is_exact(nets, net, name):
    """A constant input makes ``conv(x, W) + b`` linear in ``(W, b)``: the bound of the layer's output
    is the exact range ``conv(x, W_c) + b_c +- (conv(|x|, r_W) + r_b)``."""
    model, x, g = nets[net]
    index, kind = name.split(".")
    layer = model[int(index)]
    with torch.no_grad():
        inp = model[: int(index)](x)
    node = next(n.name for n in g.nodes if g.param_by_qualname(f"{index}.weight") in n.inputs)
    ptbs = perturb_parameters(g, {name: 0.1})
    res = compute_bounds(g, (x,), ptbs, method="CROWN", final_node=node)
    ibp = compute_bounds(g, (x,), ptbs, method="IBP", final_node=node)
    fn = torch.nn.functional.conv2d if layer.weight.dim() == 4 else torch.nn.functional.conv1d
    conv = lambda a, w, b: fn(a, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    W, b = layer.weight.detach(), layer.bias.detach()
    center = conv(inp, W, b)
    if kind == "weight":
        radius = conv(inp.abs(), torch.full_like(W, 0.1), None)
    else:
        radius = torch.full_like(center, 0.1)
    for r in (res, ibp):
        assert torch.allclose(r.lower, center - radius, atol=1e-5)
        assert torch.allclose(r.upper, center + radius, atol=1e-5)


def test_conv_weight_coefficient_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    for dims, groups, stride, padding, dilation in ((2, 1, (2, 1), (1, 0), (1, 2)), (2, 2, (1, 1), (1, 1), (1, 1)),
                                                    (1, 1, (2,), (1,), (1,)), (1, 3, (1,), (0,), (2,))):
        x = torch.randn(2, 6, *([7] * dims), generator=gen)
        W = torch.randn(3 * groups if groups > 1 else 4, 6 // groups, *([3] * dims), generator=gen)
        conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv1d
        out = conv(x, W, None, stride, padding, dilation, groups)
        A = torch.randn(2, 3, *out.shape[1:], generator=gen)
        got = conv_weight_coefficient(A, x, W.shape, stride, padding, dilation, groups)
        for b in range(2):
            for s in range(3):
                Wg = W.clone().requires_grad_(True)
                val = (conv(x[b:b + 1], Wg, None, stride, padding, dilation, groups) * A[b:b + 1, s]).sum()
                (grad,) = torch.autograd.grad(val, Wg)
                assert torch.allclose(got[b, s], grad, atol=1e-4)


def test_wide_and_degenerate_parameter_intervals(nets):
    model, x, g = nets["conv2d"]
    wide = perturb_parameters(g, {"0.weight": 1e3, "1.weight": 0.0})
    wide[g.inputs[0]] = PerturbationLpNorm(0.0)
    for m in METHODS:
        r = compute_bounds(g, (x,), wide, method=m)
        assert not torch.isnan(r.lower).any() and not torch.isnan(r.upper).any()
        assert (r.lower <= r.upper).all()
    check_sampled(model, x, g, wide, {m: compute_bounds(g, (x,), wide, method=m) for m in METHODS}, n=40)


def test_perturb_parameters_names(nets):
    model, x, g = nets["mlp"]
    ptbs = perturb_parameters(g, {"0.weight": PerturbationLpNorm(0.1), "*.bias": 0.01})
    names = {g.qualname(leaf) for leaf in ptbs}
    assert names == {"0.weight", "0.bias", "2.bias", "3.bias", "5.bias"}
    rel = perturb_parameters(g, {"2.weight": 0.1}, relative=True)
    (leaf,) = rel
    assert torch.allclose(rel[leaf].eps, 0.1 * model[2].weight.abs())
    with pytest.raises(KeyError):
        perturb_parameters(g, {"nope.weight": 0.1})
    with pytest.raises(ValueError):
        perturb_parameters(g, {"0.weight": 0.1}, relative=True, norm=2)


def test_l2_weight_perturbation_sound(nets):
    model, x, g = nets["mlp"]
    ptbs = perturb_parameters(g, {"0.weight": 0.1, "2.weight": 0.1}, norm=2)
    results = {m: compute_bounds(g, (x,), ptbs, method=m) for m in METHODS}
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(100):
            over = {}
            for name in ("0.weight", "2.weight"):
                d = torch.randn(params[name].shape, generator=gen)
                over[name] = params[name] + 0.1 * d / d.norm()
            y = torch.func.functional_call(model, {**params, **over}, (x,))
            for r in results.values():
                assert (r.lower <= y + 1e-5).all() and (r.upper >= y - 1e-5).all()


def test_gradient_reaches_the_weights(nets):
    """Certified training differentiates the bound with respect to the (perturbed) weights."""
    model, x, g = nets["conv2d"]
    ptbs = perturb_parameters(g, {"*.weight": 0.01}, relative=True)
    r = compute_bounds(g, (x,), ptbs, method="CROWN-IBP")
    (r.upper - r.lower).sum().backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
    model.zero_grad()


def test_bounded_parameter_conv_and_bn():
    """auto_LiRPA's way: a BoundedParameter in the model (conv and batch norm weights)."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), _bn(2, gen), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)).eval()
    model[0].weight = BoundedParameter(model[0].weight.data.clone(), PerturbationLpNorm(0.05))
    model[1].weight = BoundedParameter(model[1].weight.data.clone(), PerturbationLpNorm(0.05))
    x = torch.rand(2, 1, 5, 5, generator=gen)
    net = BoundedModule(model, x)
    xb = BoundedTensor(x, PerturbationLpNorm(0.02))
    bounds = {m: net.compute_bounds(x=(xb,), method=m) for m in ("IBP", "CROWN")}
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        for i in range(100):
            over = {}
            for name in ("0.weight", "1.weight"):
                u = torch.rand(params[name].shape, generator=gen)
                over[name] = params[name] + 0.05 * (2 * (u.round() if i % 2 else u) - 1)
            xi = x + 0.02 * (2 * torch.rand(x.shape, generator=gen) - 1)
            y = torch.func.functional_call(model, {**params, **over}, (xi,))
            for lb, ub in bounds.values():
                assert (lb <= y + 1e-5).all() and (ub >= y - 1e-5).all()


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs(tmp_path):
    example = _load_example("weight_perturbation")
    report = example.main(["--epochs", "2", "--samples", "200", "--radii", "0.01", "--directions", "2",
                           "--out", str(tmp_path / "landscape.png")])
    for row in report["rows"]:
        assert row["certified"] >= row["sampled_worst"] - 1e-4
        assert math.isfinite(row["certified"])
    assert (tmp_path / "landscape.png").exists()


def test_rules_give_infinite_not_nan_bounds_on_unbounded_intervals():
    from boundprop.algorithms.backward import BackwardCall
    from boundprop.domains import Interval
    from boundprop.graph import ops
    from boundprop.rules import Var, rules_for

    x = torch.zeros(1, 2, 4, 4)
    W = torch.randn(3, 2, 3, 3)
    xv = Var("x", x, Interval(torch.full_like(x, -float("inf")), torch.full_like(x, float("inf"))))
    wv = Var("w", W, Interval(W - 0.1, W + 0.1), batched=False)
    A = torch.randn(1, 2, 3, 2, 2)
    rule = rules_for(torch.ops.aten.conv2d.default).backward
    out = rule(BackwardCall(None, (xv, wv, None), {}, A, A, {}))
    assert (out.lbias == -float("inf")).all() and (out.ubias == float("inf")).all()
    bn_rule = rules_for(ops.batch_norm_eval).backward
    w = torch.ones(2)
    bn_args = (xv, Var("g", w, Interval(w - 0.1, w + 0.1), batched=False), None, torch.zeros(2), torch.ones(2),
               0.1, 1e-5)
    B = torch.randn(1, 2, 2, 4, 4)
    out = bn_rule(BackwardCall(None, bn_args, {}, B, B, {}))
    assert not torch.isnan(torch.as_tensor(out.lbias)).any() and (torch.as_tensor(out.lbias) <= 0).all()
    assert (torch.as_tensor(out.ubias) == float("inf")).all()
