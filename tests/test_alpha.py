"""alpha-CROWN (algorithms/alpha.py): order with CROWN, soundness, specs, options, coefficients.

The LP/MILP oracles (alpha-CROWN between CROWN and the triangle LP, and reaching it with fixed
intermediate bounds) are in test_oracles.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from soundness import assert_sound

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def mlp(widths, act=nn.ReLU):
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, stride=2)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


NETS = {
    "mlp2": (lambda: mlp([4, 16, 16, 3]), (3, 4), 0.3),
    "mlp4": (lambda: mlp([3, 10, 12, 10, 8, 2]), (2, 3), 0.4),
    "leaky": (lambda: mlp([5, 12, 12, 4], act=lambda: nn.LeakyReLU(0.1)), (2, 5), 0.3),
    "tanh": (lambda: mlp([3, 8, 8, 2], act=nn.Tanh), (1, 3), 0.5),
    "cnn": (SmallCNN, (2, 1, 10, 10), 0.1),
}


def widths(res):
    return float((res.upper - res.lower).mean())


@pytest.mark.parametrize("name", list(NETS))
def test_at_least_as_tight_as_crown_and_sound(name):
    build, shape, eps = NETS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    res = assert_sound(model, x, eps=eps, methods=("CROWN", "alpha-CROWN"))
    crown, alpha = res["CROWN"], res["alpha-CROWN"]
    assert (alpha.lower >= crown.lower).all() and (alpha.upper <= crown.upper).all()
    assert widths(alpha) < widths(crown)  # every net here has unstable neurons: the slopes do matter
    assert not alpha.lower.requires_grad and not alpha.upper.requires_grad
    assert all(p.grad is None for p in model.parameters())  # the model's parameters collect nothing


_MLP = mlp([3, 8, 8, 8, 2]).eval()
_GRAPH = boundprop.capture(_MLP, torch.zeros(2, 3))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), eps=st.floats(0.05, 1.0), batch=st.integers(1, 3))
def test_random_weights_order_and_soundness(seed, eps, batch):
    torch.manual_seed(seed)
    for m in _MLP:
        if isinstance(m, nn.Linear):
            m.reset_parameters()  # the captured graph reads the parameters live
    x = torch.randn(batch, 3)
    res = assert_sound(_MLP, x, eps=eps, methods=("CROWN", "alpha-CROWN"), graph=_GRAPH, n_random=64)
    crown, alpha = res["CROWN"], res["alpha-CROWN"]
    assert (alpha.lower >= crown.lower).all() and (alpha.upper <= crown.upper).all()
    for name, iv in alpha.intervals.items():  # intermediate intervals: never looser than CROWN's
        assert (iv.lower >= crown.intervals[name].lower - 1e-6).all(), name
        assert (iv.upper <= crown.intervals[name].upper + 1e-6).all(), name


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(3)
    model = mlp([5, 20, 20, 20, 4], act=lambda: nn.LeakyReLU(0.05)).eval()
    x = torch.randn(2, 5)
    graph = boundprop.capture(model, x)
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.3)}
    C = torch.randn(2, 6, 4)
    return model, graph, x, ptb, C


def test_spec_matrix_and_lower_only(case):
    model, graph, x, ptb, C = case
    crown = compute_bounds(graph, (x,), ptb, method="CROWN", C=C)
    both = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C)
    low = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, upper=False)
    assert both.lower.shape == (2, 6) and low.upper is None
    assert (both.lower >= crown.lower).all() and (both.upper <= crown.upper).all()
    assert (low.lower >= crown.lower).all() and widths(both) < widths(crown)
    torch.testing.assert_close(low.lower, both.lower)  # the lower side is optimised first, alone
    # sound: C y on points of the box
    points = x.unsqueeze(1) + 0.3 * (2 * torch.rand(2, 500, 5) - 1)
    with torch.no_grad():
        spec = torch.einsum("bsk,bnk->bns", C, model(points.reshape(-1, 5)).reshape(2, 500, 4))
    assert (spec >= low.lower.unsqueeze(1) - 1e-5).all() and (spec <= both.upper.unsqueeze(1) + 1e-5).all()


def test_A_gives_the_returned_bounds(case):
    model, graph, x, ptb, C = case
    res = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, need_A=[graph.inputs[0]])
    A = res.A[graph.inputs[0]]
    p = ptb[graph.inputs[0]]
    torch.testing.assert_close(p.concretize(x, A["lA"], -1) + A["lbias"], res.lower)
    torch.testing.assert_close(p.concretize(x, A["uA"], +1) + A["ubias"], res.upper)


def test_chunked_intermediate_walks_give_the_same_bounds(case):
    _, graph, x, ptb, C = case
    whole = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C)
    chunked = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, opts={"max_coefficient_elements": 200})
    torch.testing.assert_close(chunked.lower, whole.lower, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.upper, whole.upper, atol=1e-5, rtol=1e-5)


def test_no_iteration_is_crown(case):
    _, graph, x, ptb, C = case
    crown = compute_bounds(graph, (x,), ptb, method="CROWN", C=C)
    for args in ({"iteration": 0}, {"enable_alpha_crown": False}):
        res = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, opts={"optimize_bound_args": args})
        torch.testing.assert_close(res.lower, crown.lower.detach())
        torch.testing.assert_close(res.upper, crown.upper.detach())


def test_options(case):
    _, graph, x, ptb, C = case
    crown = compute_bounds(graph, (x,), ptb, method="CROWN", C=C)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, opts={"optimize_bound_args": {
            "optimizer": "sgd", "lr_alpha": 0.1, "iteration": 5, "no_such_key": 1, "lr_beta": 0.1,
            "start_save_best": 0.2, "use_shared_alpha": True}})
    assert any("no_such_key" in str(w.message) for w in caught)
    assert not any("lr_beta" in str(w.message) for w in caught)
    assert (res.lower >= crown.lower).all() and (res.upper <= crown.upper).all()
    # None stands for auto_LiRPA's default functions (the compat layer passes them so)
    res = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, opts={"optimize_bound_args": {
        "iteration": 3, "loss_reduction_func": None, "stop_criterion_func": None}})
    assert (res.lower >= crown.lower).all()
    # a criterion met at once stops after the first evaluation (CROWN's slopes): CROWN's bounds
    res = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, opts={"optimize_bound_args": {
        "stop_criterion_func": lambda bound: torch.ones_like(bound, dtype=torch.bool)}})
    torch.testing.assert_close(res.lower, crown.lower.detach())
    with pytest.raises(ValueError, match="optimizer"):
        compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts={"optimize_bound_args": {"optimizer": "lbfgs"}})


def test_fix_interm_bounds_keeps_given_intervals(case):
    _, graph, x, ptb, C = case
    crown = compute_bounds(graph, (x,), ptb, method="CROWN", C=C)
    pre = [n.name for n in graph.nodes if n.target == torch.ops.aten.linear.default][:-1]
    given_bounds = {n: (crown.intervals[n].lower.detach(), crown.intervals[n].upper.detach()) for n in pre}
    fixed = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, interm_bounds=given_bounds)
    free = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", C=C, interm_bounds=given_bounds,
                          opts={"optimize_bound_args": {"fix_interm_bounds": False}})
    for n in pre:
        torch.testing.assert_close(fixed.intervals[n].lower, given_bounds[n][0])
        assert (free.intervals[n].lower >= given_bounds[n][0]).all()
        assert (free.intervals[n].upper <= given_bounds[n][1]).all()
    assert (fixed.lower >= crown.lower).all() and (free.lower >= crown.lower).all()
    assert widths(free) < widths(fixed)  # optimising the intermediate bounds too pays off here


def test_alpha_crown_optimises_under_no_grad():
    """Verification code usually runs under torch.no_grad(); alpha-CROWN must still optimise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(2, 4)
    graph = boundprop.capture(model, x)
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.3)}
    crown = compute_bounds(graph, (x,), ptb, method="CROWN")
    with torch.no_grad():
        alpha = compute_bounds(graph, (x,), ptb, method="alpha-CROWN")
    assert float((alpha.upper - alpha.lower).mean()) < float((crown.upper - crown.lower).mean()) - 1e-3
