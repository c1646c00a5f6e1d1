"""The cost-only paths of the backward walk give the bounds of the plain path.

``algorithms/backward.py`` has paths that change only how the same numbers are computed:
``_shared_columns`` (a linear layer after a walk's first relaxation: ``uA W = lA W + (uA - lA) W``
over the differing columns), ``_joint`` (both sides of a small linear/conv layer in one call), the
per-example matrix-vector products of ``_sum_product`` (and the one-product bias of small per-spec
relaxations), stacked sides, both sides' alpha-CROWN relaxations from one call (``[C; -C]`` walked as one
side), ReLU's prepared relaxation and relaxations applied a slice of the batch at a time;
convolutions also pick their kernel per shape (:mod:`boundprop.kernels`). Each is switched off
and the bounds compared (CROWN and CROWN-IBP, batch 1 and 3, dense and channels-last
coefficients); the soundness of the bounds themselves is checked by the whole-model tests.
Likewise the per-node memos (``node_memo``) and the IBP refresh that skips nodes whose inputs
stayed (``crown.refresh_ibp``), compared bit for bit on the zoo's transformer, LSTM and others.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.algorithms import backward
from boundprop.rules import RelaxCall
from boundprop.rules.registry import rules_for
from boundprop.rules.relu import relu_prepared, relu_relaxation
from boundprop.syncs import device_paths

_MODELS: dict = {}


def _models():
    if _MODELS:
        return _MODELS
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    _MODELS.update(mlp=mlp.eval(), cnn=cnn.eval())
    return _MODELS


_GRAPHS: dict = {}


def _bounds(model, x, method, conv_mode="patches"):
    key = (id(model), tuple(x.shape[1:]))
    if key not in _GRAPHS:  # one capture per model (the graph reads the live weights)
        _GRAPHS[key] = (model, boundprop.capture(model, x[:1]))
    graph = _GRAPHS[key][1]
    with torch.no_grad():
        res = compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(0.05)}, method=method,
                             opts={"conv_mode": conv_mode})
    return res.lower, res.upper, res.intervals


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", ["CROWN", "CROWN-IBP"])
def test_fast_paths_match_plain_path(monkeypatch, name, batch, method):
    model = _models()[name]
    x = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    conv_mode = "matrix" if name == "cnn" else "patches"  # dense (channels-last) coefficients through convs
    with monkeypatch.context() as m:  # every fast path on, even for these small tensors
        m.setattr(backward, "SHARED_ELEMENTS", 1)
        m.setattr(backward, "SHARED_FRACTION", 1.0)
        m.setattr(backward, "PER_EXAMPLE_ELEMENTS", 1)
        m.setattr(backward, "SLICED_BYTES", 0)
        m.setattr(backward, "SLICE_BYTES", 1)
        fast = _bounds(model, x, method, conv_mode)
    with monkeypatch.context() as m:  # every fast path off
        m.setattr(backward, "SHARED_ELEMENTS", 2**62)
        m.setattr(backward, "JOINT_ELEMENTS", 0)
        m.setattr(backward, "PER_EXAMPLE_ELEMENTS", 2**62)
        m.setattr(backward, "STACK_ROWS", 0)
        m.setattr(backward, "SLICED_BYTES", 2**62)
        m.setattr(rules_for(torch.ops.aten.relu.default), "prepared", None)
        m.setenv("BOUNDPROP_CONV_TUNING", "0")
        plain = _bounds(model, x, method, conv_mode)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-5, atol=1e-5)
    for node, iv in plain[2].items():
        torch.testing.assert_close(fast[2][node].lower, iv.lower, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast[2][node].upper, iv.upper, rtol=1e-5, atol=1e-5)


def test_shared_columns_is_exact_on_random_sides(monkeypatch):
    """``uA W`` from ``lA W`` and the differing columns, per example, equals the direct product."""
    monkeypatch.setattr(backward, "SHARED_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(0)
    lA = torch.randn(4, 7, 300, generator=gen)
    uA = lA.clone()
    for b in range(4):  # a different set of differing columns per example (and none in one)
        cols = torch.randperm(300, generator=gen)[: 20 * b]
        uA[b, :, cols] += torch.randn(7, cols.numel(), generator=gen)
    weight, bias = torch.randn(300, 11, generator=gen), torch.randn(300, generator=gen)
    (low, lbias), (up, ubias) = backward._shared_columns(lA, uA, (None, weight, bias), {})
    torch.testing.assert_close(low[0], lA @ weight)
    torch.testing.assert_close(up[0], uA @ weight, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lbias, lA @ bias)
    torch.testing.assert_close(ubias, uA @ bias)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("upper", [False, True])
def test_sliced_relaxation_equals_whole(monkeypatch, channels_last, upper):
    """Slices of 1 and 2 examples (and a batch that does not divide) give the whole tensor's coefficients,
    in its layout, and its bias; under autograd the whole-tensor path is kept."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5 * 3, 4, 6, 6, generator=gen)
    if channels_last:
        A = A.contiguous(memory_format=torch.channels_last)
    A = A.view(5, 3, 4, 6, 6)
    centre, radius = torch.randn(5, 4, 6, 6, generator=gen), torch.rand(5, 4, 6, 6, generator=gen)
    l, u = centre - radius, centre + radius
    prep = backward.PreparedRelaxation.of(relu_relaxation(l, u, RelaxCall()), l.shape)
    monkeypatch.setattr(backward, "SLICED_BYTES", 2**62)
    whole, whole_bias = backward._relax_side(A, prep, upper)
    monkeypatch.setattr(backward, "SLICED_BYTES", 0)
    for slice_bytes in (1, 2 * A[0].numel() * A.element_size()):
        monkeypatch.setattr(backward, "SLICE_BYTES", slice_bytes)
        assert backward._in_slices(A, (prep.lw,))
        new, bias = backward._relax_side(A, prep, upper)
        torch.testing.assert_close(new, whole)
        torch.testing.assert_close(bias, whole_bias)
        assert new.stride() == whole.stride()
    assert not backward._in_slices(A.requires_grad_(), (prep.lw,))
    assert not backward._in_slices(A[:1], (prep.lw[:1],))


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_small_per_spec_bias_equals_contractions(monkeypatch, upper, with_alpha):
    """Small coefficients with per-spec relaxations (alpha-CROWN's lines carry the spec dimension) sum
    their bias from one product tensor; that equals the two contractions, channels-last included."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(2, 3, 4, 5, 5, generator=gen)
    centre, radius = torch.randn(2, 4, 5, 5, generator=gen), torch.rand(2, 4, 5, 5, generator=gen)
    l, u = centre - radius, centre + radius
    alpha = torch.rand(2, 3, 4, 5, 5, generator=gen) if with_alpha else None
    lifted = (l.unsqueeze(1), u.unsqueeze(1)) if with_alpha else (l, u)
    relax = relu_relaxation(*lifted, RelaxCall((), {}, {}, alpha))
    prep = backward.PreparedRelaxation.of(relax, (2, 4, 5, 5))
    for data in (A, A.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(A.shape)):
        assert prep.per_spec == with_alpha
        monkeypatch.setattr(backward, "SMALL_PER_SPEC", 0)
        ref, ref_bias = backward._relax_side(data, prep, upper)
        monkeypatch.setattr(backward, "SMALL_PER_SPEC", 2**16)
        new, bias = backward._relax_side(data, prep, upper)
        torch.testing.assert_close(new, ref, rtol=0, atol=0)
        torch.testing.assert_close(bias, ref_bias, rtol=1e-6, atol=1e-5)


def test_relu_prepared_equals_general_relaxation():
    """ReLU's prepared relaxation is the general rule's ``(lw, uw - lw, lb, ub - lb)`` on stable, unstable
    and one-sided intervals; ``l = u = 0`` has slopes 0 (exact too); an infinite end defers (None)."""
    gen = torch.Generator().manual_seed(0)
    centre, radius = torch.randn(4, 50, generator=gen), torch.rand(4, 50, generator=gen)
    l, u = centre - radius, centre + radius
    l[0, :5], u[0, :5] = 0.0, torch.rand(5, generator=gen)  # l = 0
    l[1, :5], u[1, :5] = -torch.rand(5, generator=gen), 0.0  # u = 0
    l[2, :5] = u[2, :5] = 0.0  # a point at 0
    call = RelaxCall()
    lw, d, lb, db = relu_prepared(l, u, call)
    general = backward.PreparedRelaxation.of(relu_relaxation(l, u, call), l.shape)
    point = (l == 0) & (u == 0)
    assert lb is None and general.lb is None
    torch.testing.assert_close(lw[~point], general.lw[~point])
    torch.testing.assert_close(d, general.d)
    torch.testing.assert_close(db, general.db)
    assert bool((lw[point] == 0).all()) and bool((d[point] == 0).all())
    t = torch.rand(64, *l.shape, generator=gen)  # sampled points (corners included) lie between the lines
    points = torch.cat([l[None], u[None], l + t * (u - l)])
    below, above = lw * points, (lw + d) * points + db
    assert bool((below <= torch.relu(points) + 1e-6).all()) and bool((torch.relu(points) <= above + 1e-6).all())
    assert relu_prepared(l.abs() + 1, u.abs() + 2, call)[1:] == (None, None, None)  # all active: exact
    for end in (torch.inf, -torch.inf):
        bad_l, bad_u = l.clone(), u.clone()
        (bad_u if end > 0 else bad_l)[3, 0] = end
        assert relu_prepared(bad_l, bad_u, call) is None
    assert relu_prepared(l, u, RelaxCall(opts={"activation_bound_option": "zero-lb"})) is None



def test_relu_prepared_without_host_reads_equals_general_rule_at_infinite_ends():
    """Where values may not be read (accelerators), the prepared relaxation takes the general rule's
    limits at infinite ends, branch-free: fields equal to the general rule's, ends of every kind."""
    inf = torch.inf
    l = torch.tensor([[-1.0, -inf, -inf, -inf, 0.5, -2.0, -inf, -3.0, 1.0, -1.0]])
    u = torch.tensor([[inf, 2.0, -1.0, inf, inf, 3.0, 0.0, -1.0, 2.0, 0.0]])
    call = RelaxCall()
    general = backward.PreparedRelaxation.of(relu_relaxation(l, u, call), l.shape)
    with device_paths():
        lw, d, lb, db = relu_prepared(l, u, call)
    assert lb is None and general.lb is None
    torch.testing.assert_close(lw, general.lw)
    torch.testing.assert_close(d, general.d)
    torch.testing.assert_close(db, general.db)


def test_prepared_relaxation_is_silent_under_autograd():
    """Bounds trained through (parameters requiring grad, grad mode on) raise no autograd warning from
    the prepared relaxation's finiteness check, and stay differentiable."""
    model = _models()["mlp"]
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    graph = boundprop.capture(model, x[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(0.05)}, method="CROWN")
    res.lower.sum().backward()
    assert model[1].weight.grad is not None
    model.zero_grad()


def test_split_spec_keeps_shared_fields_and_relaxations_without_spec_rows():
    """``split_spec`` slices per-spec fields, shares the ones broadcast along the spec and leaves a
    relaxation without spec rows (its dimension 1 is the node's) whole."""
    lw, d = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    lb = torch.randn(2, 1, 3)
    first, rest = backward.PreparedRelaxation(lw, d, lb, None, per_spec=True).split_spec(2)
    assert torch.equal(first.lw, lw[:, :2]) and torch.equal(rest.d, d[:, 2:])
    assert first.lb is lb and rest.lb is lb and first.db is None
    plain = backward.PreparedRelaxation(torch.randn(2, 3), None, None, None, per_spec=False)
    first, rest = plain.split_spec(1)
    assert first is plain and rest is plain


def _zoo_case(name: str, seed: int):
    """A zoo model's graph, a batch of 2 inputs and an L-inf ball of 0.05 around them."""
    from boundprop.zoo import ZOO

    fn, shape = ZOO[name]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    graph = boundprop.capture(fn(), x)
    return graph, x, {graph.inputs[0]: PerturbationLpNorm(0.05)}


@pytest.mark.parametrize("name", ["mlp", "lstm", "gelu_layernorm_mlp"])
def test_both_sides_from_one_relaxation_call(monkeypatch, name):
    """alpha-CROWN relaxes a node for both sides of a walk in one call (the two parameter sets stacked
    along the spec dimension): the same bounds as one call per side, after a few steps too."""
    graph, x, ptb = _zoo_case(name, seed=4)
    opts = {"optimize_bound_args": {"iteration": 4}}
    joined = []
    joinable = backward._joinable
    monkeypatch.setattr(backward, "_joinable", lambda *a: joined.append(joinable(*a)) or joined[-1])
    one = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts=opts)
    assert any(joined)
    monkeypatch.setattr(backward, "_joinable", lambda *a: False)
    two = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts=opts)
    torch.testing.assert_close(one.lower, two.lower, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one.upper, two.upper, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["transformer", "gelu_layernorm_mlp", "lstm"])
@pytest.mark.parametrize("method", ["CROWN", "alpha-CROWN"])
def test_node_memos_change_no_bound(monkeypatch, name, method):
    """The per-node memos (layer norm's and softmax's relaxations, a curve's searches under alpha)
    only save work: with a fresh memo at every use the bounds and intervals are the same. (alpha-CROWN
    with one evaluation: after a step the shared parts' gradients are summed in another order, and the
    bounds move in the last digits.)"""
    graph, x, ptb = _zoo_case(name, seed=3)
    opts = {"optimize_bound_args": {"iteration": 1}}

    def run():
        torch.manual_seed(0)
        return compute_bounds(graph, (x,), ptb, method=method, opts=opts)

    shared = run()
    made = []
    monkeypatch.setattr(backward, "node_memo", lambda state, node: made.append(node.name) or {})
    alone = run()
    assert made, "no rule asked for a memo"
    torch.testing.assert_close(shared.lower, alone.lower, rtol=0, atol=0)
    torch.testing.assert_close(shared.upper, alone.upper, rtol=0, atol=0)
    for node, iv in alone.intervals.items():
        torch.testing.assert_close(shared.intervals[node].lower, iv.lower, rtol=0, atol=0)
        torch.testing.assert_close(shared.intervals[node].upper, iv.upper, rtol=0, atol=0)


def test_node_memo_follows_the_input_intervals():
    """One memo per node while its input intervals are the same objects; a new one when one changes."""
    from types import SimpleNamespace

    from boundprop.domains import Interval

    iv = Interval(torch.zeros(1, 2), torch.ones(1, 2))
    state = SimpleNamespace(intervals={"x": iv}, cache={})
    node = SimpleNamespace(name="n", inputs=["x", "w"])
    first = backward.node_memo(state, node)
    first["k"] = 1
    assert backward.node_memo(state, node) is first
    state.intervals["x"] = Interval(iv.lower.clone(), iv.upper.clone())  # equal values, a new object
    assert backward.node_memo(state, node) is not first


@pytest.mark.parametrize("name", ["transformer", "lstm", "resnet"])
def test_ibp_refresh_skips_only_nodes_whose_inputs_stayed(monkeypatch, name):
    """``refresh_ibp`` recomputes a node only when one of its inputs' intervals changed: the bounds and
    intervals equal those of recomputing every unrefined ancestor after each refinement."""
    from boundprop.algorithms import crown
    from boundprop.algorithms.ibp import interval_of

    graph, x, ptb = _zoo_case(name, seed=4)
    skipping = compute_bounds(graph, (x,), ptb, method="CROWN")

    def every_time(state, start):
        before = crown.ancestors(state, start)
        for node in state.graph.nodes:
            n = node.name
            if n in before and n in state.perturbed and n not in state.refined:
                state.intervals[n] = interval_of(state, n).intersect(state.intervals[n])

    monkeypatch.setattr(crown, "refresh_ibp", every_time)
    plain = compute_bounds(graph, (x,), ptb, method="CROWN")
    torch.testing.assert_close(skipping.lower, plain.lower, rtol=0, atol=0)
    torch.testing.assert_close(skipping.upper, plain.upper, rtol=0, atol=0)
    for node, iv in plain.intervals.items():
        torch.testing.assert_close(skipping.intervals[node].lower, iv.lower, rtol=0, atol=0)
        torch.testing.assert_close(skipping.intervals[node].upper, iv.upper, rtol=0, atol=0)
