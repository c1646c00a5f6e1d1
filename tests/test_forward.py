"""Forward-mode LiRPA ("forward") and forward intermediate bounds with a CROWN final walk ("forward+backward")."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from soundness import assert_sound, box_points, pgd_extremes

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.rules import rules_for
from boundprop.rules.affine_forward import linear_forward
from boundprop.rules.generic import AffinePushforward
from boundprop.rules.registry import Var

METHODS = ("forward", "forward+backward")
PEER = Path("/work/shared/peer")
aten = torch.ops.aten


def _width(res) -> float:
    return float((res.upper - res.lower).mean())


def _reinit(model: nn.Module, seed: int) -> None:
    """New weights in place (a captured graph reads them live)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.LeakyReLU(0.1), nn.Linear(12, 3)).eval()
    x = torch.randn(2, 5)
    return model, x, boundprop.capture(model, x)


class ResidualCNN(nn.Module):
    """Convolutions, eval batch norm, a residual connection and signed affine ops (sub, neg, div, mean)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x)) + x.repeat(1, 2, 1, 1)
        h = torch.relu(self.bn(self.c2(h)))
        h = h - 0.5 * h.mean(dim=(2, 3), keepdim=True)
        return self.fc(-h.flatten(1) / 3)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(1)
    model = ResidualCNN().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, 6, 6)
    return model, x, boundprop.capture(model, x)


# --- soundness ----------------------------------------------------------------------------------


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.01, 0.1, 0.5, 2.0]))
def test_mlp_sound_linf(mlp, seed, eps):
    model, x, graph = mlp
    _reinit(model, seed)
    assert_sound(model, x, eps, METHODS, graph=graph)


def test_mlp_sound_l2_and_box(mlp):
    model, x, graph = mlp
    _reinit(model, 3)
    assert_sound(model, x, 0.8, METHODS, norm=2, graph=graph)
    assert_sound(model, x, 0.3, METHODS, x_L=x - 0.1, x_U=x + 0.5, graph=graph)


def test_cnn_residual_sound_and_intervals(cnn):
    model, x, graph = cnn
    res = assert_sound(model, x, 0.1, METHODS + ("IBP",), graph=graph)
    ibp = res["IBP"].intervals
    for name, box in res["forward"].intervals.items():  # forward-mode intervals are never looser than IBP
        assert bool((box.lower >= ibp[name].lower - 1e-6).all() and (box.upper <= ibp[name].upper + 1e-6).all())
    assert _width(res["forward"]) < _width(res["IBP"])


class TwoInputs(nn.Module):
    """Two perturbed inputs meeting in products of perturbed tensors (one a square) and sums."""

    def __init__(self):
        super().__init__()
        self.fa = nn.Linear(3, 6)
        self.fb = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, a, b):
        h = torch.relu(self.fa(a))
        g = self.fb(b)
        return self.out(h * g + g * g - h)


@pytest.fixture(scope="module")
def two_inputs():
    torch.manual_seed(2)
    model = TwoInputs().eval()
    a, b = torch.randn(2, 3), torch.randn(2, 4)
    return model, (a, b), boundprop.capture(model, (a, b))


def test_two_perturbed_inputs_sound(two_inputs):
    model, (a, b), graph = two_inputs
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.2), graph.inputs[1]: PerturbationLpNorm(0.1)}
    results = {m: compute_bounds(graph, (a, b), ptb, method=m) for m in METHODS}
    joint = lambda z: model(z[:, :3], z[:, 3:])  # noqa: E731
    for i in range(a.shape[0]):
        lo = torch.cat([a[i] - 0.2, b[i] - 0.1])
        hi = torch.cat([a[i] + 0.2, b[i] + 0.1])
        points = torch.cat([box_points(lo, hi, 512), pgd_extremes(joint, lo, hi, 2)])
        with torch.no_grad():
            out = joint(points)
        for method, res in results.items():
            assert bool((out >= res.lower[i] - 1e-5).all()), method
            assert bool((out <= res.upper[i] + 1e-5).all()), method
    # the second input constant: only the first one perturbed, never looser
    one = compute_bounds(graph, (a, b), {graph.inputs[0]: PerturbationLpNorm(0.2)}, method="forward")
    assert bool((one.lower >= results["forward"].lower - 1e-6).all())


# --- exactness and order --------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [math.inf, 2])
def test_single_linear_layer_closed_form(mlp, norm):
    """Forward bounds of ``W x + b`` are ``W x0 + b -+ eps ||W_row||_q`` (and of ``C (W x + b)``: ``||C W||``)."""
    model, x, graph = mlp
    _reinit(model, 5)
    first = next(node.name for node in graph.nodes if node.target == aten.linear.default)
    W, b, eps = model[0].weight.detach(), model[0].bias.detach(), 0.3
    ptb = {graph.inputs[0]: PerturbationLpNorm(eps, norm)}
    q = 1.0 if norm == math.inf else 2.0
    res = compute_bounds(graph, (x,), ptb, method="forward", final_node=first)
    center, radius = x @ W.T + b, eps * W.norm(p=q, dim=1)
    torch.testing.assert_close(res.lower, center - radius, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.upper, center + radius, atol=1e-5, rtol=1e-5)
    C = torch.randn(1, 4, 16)
    res = compute_bounds(graph, (x,), ptb, method="forward", final_node=first, C=C)
    center, radius = center @ C[0].T, eps * (C[0] @ W).norm(p=q, dim=1)
    torch.testing.assert_close(res.lower, center - radius, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.upper, center + radius, atol=1e-5, rtol=1e-5)


def test_forward_backward_at_least_as_tight_as_crown_ibp(mlp, cnn):
    model, x, graph = mlp
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.3)}
    for seed in range(3):
        _reinit(model, 10 + seed)
        widths = {m: _width(compute_bounds(graph, (x,), ptb, method=m)) for m in ("forward+backward", "CROWN-IBP")}
        assert widths["forward+backward"] <= widths["CROWN-IBP"] + 1e-6, widths
    model, x, graph = cnn
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.1)}
    widths = {m: _width(compute_bounds(graph, (x,), ptb, method=m)) for m in ("forward+backward", "CROWN-IBP")}
    assert widths["forward+backward"] <= widths["CROWN-IBP"] + 1e-6, widths


def test_spec_and_coefficients(mlp):
    """With ``C`` (batch 1, broadcast) the bounds hold and the returned leaf coefficients reproduce them."""
    model, x, graph = mlp
    _reinit(model, 7)
    eps = 0.2
    ptb = {graph.inputs[0]: PerturbationLpNorm(eps)}
    C = torch.tensor([[[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]])
    res = compute_bounds(graph, (x,), ptb, method="forward", C=C, need_A=[graph.inputs[0]])
    full = compute_bounds(graph, (x,), ptb, method="forward")
    assert res.lower.shape == (2, 2)
    naive = (full.lower @ C[0].clamp(min=0).T + full.upper @ C[0].clamp(max=0).T)
    assert bool((res.lower >= naive - 1e-5).all())
    A = res.A[graph.inputs[0]]
    lower = torch.einsum("bsi,bi->bs", A["lA"], x) - eps * A["lA"].abs().sum(-1) + A["lbias"]
    upper = torch.einsum("bsi,bi->bs", A["uA"], x) + eps * A["uA"].abs().sum(-1) + A["ubias"]
    torch.testing.assert_close(lower, res.lower, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upper, res.upper, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        pts = x.unsqueeze(1) + eps * (2 * torch.rand(2, 200, 5) - 1)
        out = model(pts.reshape(-1, 5)).reshape(2, 200, 3) @ C[0].T
    assert bool((out >= res.lower.unsqueeze(1) - 1e-5).all() and (out <= res.upper.unsqueeze(1) + 1e-5).all())


# --- ops with a backward rule only --------------------------------------------------------------------


class BackwardRuleOps(nn.Module):
    """Max pooling, element-wise max/min, a quotient of perturbed tensors, layer norm and softmax: ops
    that forward mode bounds through their backward rules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fa, self.fb = nn.Linear(8, 6), nn.Linear(8, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x))).flatten(1)
        a, b = self.fa(h), self.fb(h)
        h = torch.maximum(a, b) - torch.minimum(a, 0.5 * b) + a / (2 + torch.sigmoid(b))
        return self.out(torch.softmax(self.norm(h), -1))


def test_backward_rule_ops_sound_and_chunks_agree(monkeypatch):
    torch.manual_seed(0)
    model = BackwardRuleOps().eval()
    x = torch.randn(2, 1, 4, 4)
    graph = boundprop.capture(model, x)
    res = assert_sound(model, x, eps=0.1, methods=("IBP", "CROWN", *METHODS), graph=graph)
    assert _width(res["forward+backward"]) <= _width(res["IBP"])
    import boundprop.algorithms.forward as fwd

    monkeypatch.setattr(fwd, "IDENTITY_CHUNK_ELEMENTS", 5)  # a row or two of the identity at a time
    again = compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(0.1)}, method="forward")
    torch.testing.assert_close(again.lower, res["forward"].lower)
    torch.testing.assert_close(again.upper, res["forward"].upper)


# --- errors -------------------------------------------------------------------------------------------


def test_op_without_forward_rule_names_op_and_suggests_crown(two_inputs, monkeypatch):
    model, (a, b), graph = two_inputs
    monkeypatch.setattr(rules_for(aten.mul.Tensor), "forward", None)
    monkeypatch.setattr(rules_for(aten.mul.Tensor), "backward", None)
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.1), graph.inputs[1]: PerturbationLpNorm(0.1)}
    with pytest.raises(NotImplementedError, match=r"mul.*CROWN"):
        compute_bounds(graph, (a, b), ptb, method="forward")


def test_perturbed_parameter_is_refused(mlp):
    model, x, graph = mlp
    weight = graph.param_by_qualname("0.weight")
    with pytest.raises(NotImplementedError, match="perturbed parameter"):
        compute_bounds(graph, (x,), {weight: PerturbationLpNorm(0.01)}, method="forward")


# --- the generic Jacobian-vector product against the fast paths -----------------------------------------


def test_generic_pushforward_matches_fast_rules():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7)
    w, bias = torch.randn(4, 3, 3, 3), torch.randn(4)
    args = (Var("x", x), w, bias, [2, 2], [1, 1])
    T = torch.randn(2, 5, 3, 7, 7)
    push = AffinePushforward(aten.conv2d.default, args, {})
    conv = rules_for(aten.conv2d.default).affine_forward
    for absolute in (False, True):
        fast = conv([T], args, {}, absolute)
        generic = push.absolute([T]) if absolute else push.forward([T])
        torch.testing.assert_close(fast, generic, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(push.constant, bias.reshape(1, 4, 1, 1).expand(2, 4, 4, 4))
    x, w = torch.randn(3, 6), torch.randn(5, 6)
    args = (Var("x", x), w)
    T = torch.randn(1, 7, 6)  # rows shared by the batch
    push = AffinePushforward(aten.linear.default, args, {}, homogeneous=True)
    for absolute in (False, True):
        generic = push.absolute([T.expand(3, 7, 6)]) if absolute else push.forward([T.expand(3, 7, 6)])
        torch.testing.assert_close(linear_forward([T], args, {}, absolute).expand(3, 7, 5), generic)


# --- the peer library ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_b1", "cnn_b1"])
def test_matches_auto_lirpa_forward_mode(name):
    path = PEER / f"{name}.pt"
    if not path.exists():
        pytest.skip("peer models not available")
    sys.path.insert(0, str(PEER))
    import peer_models

    data = torch.load(path, weights_only=False)
    model = peer_models.build_model(name.split("_b")[0])
    model.load_state_dict(data["state_dict"])
    x = data["x"]
    graph = boundprop.capture(model, x)
    res = compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(data["eps"])}, method="forward")
    lower, upper = data["bounds"]["forward"]
    scale = float((upper - lower).abs().max())
    assert float((res.lower - lower).abs().max()) <= 1e-4 * scale
    assert float((res.upper - upper).abs().max()) <= 1e-4 * scale
