"""The auto_LiRPA-compatible layer: names, arguments, return shapes, options."""

import math

import pytest
import torch
import torch.nn as nn
from soundness import box_points

from boundprop import BoundedModule, BoundedParameter, BoundedTensor, PerturbationLpNorm


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def net_and_input():
    model = _mlp()
    x = torch.randn(2, 5)
    return model, BoundedModule(model, torch.empty_like(x)), x


def test_forward_matches_model_any_batch(net_and_input):
    model, net, _ = net_and_input
    for batch in (1, 2, 7):
        x = torch.randn(batch, 5)
        assert torch.allclose(net(x), model(x))


@pytest.mark.parametrize("alias,canonical", [("backward", "CROWN"), ("crown", "CROWN"), ("IBP+backward", "CROWN-IBP"),
                                             ("ibp+crown", "CROWN-IBP"), ("ibp", "IBP")])
def test_method_aliases(net_and_input, alias, canonical):
    _, net, x = net_and_input
    xb = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.1))
    a = net.compute_bounds(x=(xb,), method=alias)
    b = net.compute_bounds(x=(xb,), method=canonical)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_ibp_flag_and_unknown_method(net_and_input):
    _, net, x = net_and_input
    xb = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.1))
    lb, ub = net.compute_bounds(x=(xb,), IBP=True, method=None)
    lb2, ub2 = net.compute_bounds(x=(xb,), method="IBP")
    assert torch.equal(lb, lb2)
    with pytest.raises(ValueError, match="unknown bound method"):
        net.compute_bounds(x=(xb,), method="magic")


def test_return_A_reconcretizes(net_and_input):
    _, net, x = net_and_input
    eps = 0.1
    xb = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    lb, ub, A = net.compute_bounds(x=(xb,), method="CROWN", return_A=True,
                                   needed_A_dict={net.output_name[0]: [net.input_name[0]]})
    entry = A[net.output_name[0]][net.input_name[0]]
    lA, uA = entry["lA"], entry["uA"]
    assert lA.shape == (2, 3, 5)
    lower = (lA * x.unsqueeze(1)).sum(-1) - eps * lA.abs().sum(-1) + entry["lbias"]
    upper = (uA * x.unsqueeze(1)).sum(-1) + eps * uA.abs().sum(-1) + entry["ubias"]
    assert torch.allclose(lower, lb, atol=1e-5) and torch.allclose(upper, ub, atol=1e-5)


def test_spec_matrix_lower_only(net_and_input):
    _, net, x = net_and_input
    xb = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05))
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]]).unsqueeze(0).repeat(2, 1, 1)
    lb, ub = net.compute_bounds(x=(xb,), C=C, method="CROWN", bound_upper=False)
    assert ub is None and lb.shape == (2, 2)
    lo, hi = net.compute_bounds(x=(xb,), method="CROWN")
    naive = torch.stack([lo[:, 0] - hi[:, 1], lo[:, 0] - hi[:, 2]], 1)
    assert (lb >= naive - 1e-5).all()


def test_bound_opts_checked_and_honoured():
    model = _mlp(3)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="bogus"):
        BoundedModule(model, x, bound_opts={"bogus": 1})
    with pytest.raises(ValueError, match="activation_bound_option"):
        BoundedModule(model, x, bound_opts={"activation_bound_option": "nonsense"})
    ok = BoundedModule(model, x, bound_opts={"conv_mode": "matrix", "sparse_intermediate_bounds": False})
    xb = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.5))
    widths = {}
    for option in ("adaptive", "same-slope", "zero-lb", "one-lb"):
        ok.set_bound_opts({"activation_bound_option": option})
        lb, ub = ok.compute_bounds(x=(xb,), method="CROWN")
        widths[option] = float((ub - lb).mean())
        _check_contains(model, x, 0.5, lb, ub)
    assert len({round(w, 6) for w in widths.values()}) > 1
    ok.set_bound_opts({"optimize_bound_args": {"iteration": 3}})
    assert ok.bound_opts["optimize_bound_args"]["iteration"] == 3
    assert ok.bound_opts["optimize_bound_args"]["lr_alpha"] == 0.5


def _check_contains(model, x, eps, lb, ub):
    with torch.no_grad():
        for b in range(x.shape[0]):
            out = model(box_points(x[b] - eps, x[b] + eps, 200))
            assert (out >= lb[b] - 1e-5).all() and (out <= ub[b] + 1e-5).all()


def test_intermediate_bounds_readable(net_and_input):
    _, net, x = net_and_input
    xb = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.1))
    net.compute_bounds(x=(xb,), method="CROWN")
    saved = net.save_intermediate()
    assert net.output_name[0] in saved
    for name, (lo, hi) in saved.items():
        assert (lo <= hi + 1e-6).all(), name
        view = net[name]
        assert view.perturbed and torch.equal(view.lower, lo)


def test_state_dict_keys_and_gradients(net_and_input):
    model, net, x = net_and_input
    assert list(net.state_dict()) == list(model.state_dict())
    xb = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.1))
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        model.zero_grad()
        lb, ub = net.compute_bounds(x=(xb,), method=method)
        (ub - lb).sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_no_perturbation_gives_point_bounds(net_and_input):
    model, net, x = net_and_input
    lb, ub = net.compute_bounds(x=(x,), method="CROWN")
    assert torch.allclose(lb, model(x)) and torch.equal(lb, ub)


def test_box_and_l2_perturbations(net_and_input):
    model, net, x = net_and_input
    x_L, x_U = x - 0.2, x + 0.1
    xb = BoundedTensor(x, PerturbationLpNorm(x_L=x_L, x_U=x_U))
    lb, ub = net.compute_bounds(x=(xb,), method="CROWN")
    with torch.no_grad():
        for b in range(2):
            out = model(box_points(x_L[b], x_U[b], 200))
            assert (out >= lb[b] - 1e-5).all() and (out <= ub[b] + 1e-5).all()
    xb2 = BoundedTensor(x, PerturbationLpNorm(norm=2, eps=0.3))
    lb2, ub2 = net.compute_bounds(x=(xb2,), method="CROWN")
    d = torch.randn(500, 5)
    d = d / d.norm(dim=1, keepdim=True) * 0.3
    with torch.no_grad():
        for b in range(2):
            out = model(x[b] + d)
            assert (out >= lb2[b] - 1e-5).all() and (out <= ub2[b] + 1e-5).all()


def test_two_inputs_one_perturbed():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)

        def forward(self, x, y):
            return torch.relu(self.a(x) + self.b(y))

    torch.manual_seed(0)
    model = TwoInputs()
    x, y = torch.randn(2, 3), torch.randn(2, 2)
    net = BoundedModule(model, (x, y))
    xb = BoundedTensor(x, PerturbationLpNorm(eps=0.1))
    lb, ub = net.compute_bounds(x=(xb, y), method="CROWN")
    with torch.no_grad():
        for b in range(2):
            pts = box_points(x[b] - 0.1, x[b] + 0.1, 200)
            out = model(pts, y[b].expand(len(pts), 2))
            assert (out >= lb[b] - 1e-5).all() and (out <= ub[b] + 1e-5).all()


def test_interm_bounds_are_used(net_and_input):
    _, net, x = net_and_input
    xb = BoundedTensor(x, PerturbationLpNorm(eps=0.1))
    net.compute_bounds(x=(xb,), method="CROWN")
    first = net.graph.nodes[0].name
    lo, hi = net.save_intermediate()[first]
    lb, ub = net.compute_bounds(x=(xb,), method="CROWN", interm_bounds={first: (lo, hi)})
    lb2, ub2 = net.compute_bounds(x=(xb,), method="CROWN")
    assert torch.allclose(lb, lb2, atol=1e-6) and torch.allclose(ub, ub2, atol=1e-6)


def test_bounded_parameter_ibp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    w = model[0].weight.data.clone()
    model[0].weight = BoundedParameter(w, PerturbationLpNorm(eps=0.05))
    x = torch.randn(2, 4)
    net = BoundedModule(model, x)
    lb, ub = net.compute_bounds(x=(x,), method="IBP")
    with torch.no_grad():
        for _ in range(200):
            w2 = w + (torch.rand_like(w) * 2 - 1) * 0.05
            out = x @ w2.T + model[0].bias
            assert (out >= lb - 1e-5).all() and (out <= ub + 1e-5).all()
