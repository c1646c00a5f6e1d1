"""The state of a call: nominal values computed on demand (:class:`NominalValues`)."""

from __future__ import annotations

import pytest
import torch

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.algorithms import state as state_module
from boundprop.graph.ir import evaluate


def _cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(27, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.rand(2, 1, 7, 7)
    return model, x, boundprop.capture(model, x)


def test_values_on_demand_equal_a_full_evaluation():
    model, x, graph = _cnn()
    full = evaluate(graph, (x,))
    lazy = state_module.NominalValues(graph, {name: full[name] for name in graph.leaves})
    assert graph.output in lazy and lazy.get("no such node") is None
    torch.testing.assert_close(lazy[graph.output], model(x))  # computes the output's ancestors in order
    for node in graph.nodes:
        assert dict.__contains__(lazy, node.name)
        torch.testing.assert_close(lazy[node.name], full[node.name])
    with pytest.raises(KeyError):
        lazy["no such node"]


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
def test_bounds_need_no_forward_pass(monkeypatch, method):
    """IBP, CROWN-IBP and CROWN read shapes from intervals: no perturbed node's value is computed."""
    model, x, graph = _cnn()
    computed = []
    missing = state_module.NominalValues.__missing__

    def spy(self, name):
        computed.append(name)
        return missing(self, name)

    monkeypatch.setattr(state_module.NominalValues, "__missing__", spy)
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.05)}
    res = compute_bounds(graph, (x,), ptb, method=method)
    perturbed = state_module.make_state(graph, (x,), ptb).perturbed
    assert not [name for name in computed if name in perturbed]
    y = model(x)
    assert bool((res.lower <= y).all()) and bool((y <= res.upper).all())
