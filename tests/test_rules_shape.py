"""Structural ops (:mod:`boundprop.rules.shape`): ``cat`` and ``stack`` joining constant tensors to
perturbed ones carry the constants into the bounds (their constant term)."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from op_bounds import check_op, one_node_graph, random_box

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.graph.ir import Ref

aten = torch.ops.aten


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(-4, 1), stack=st.booleans(), first=st.booleans())
def test_join_with_a_constant_op_level(seed, scale, stack, first):
    row = torch.randn(1, 3, generator=torch.Generator().manual_seed(seed)) * 5
    const = row.expand(2, 3).contiguous()  # the same for both examples: fn below sees one example's points
    parts = [Ref("c"), Ref("x")] if first else [Ref("x"), Ref("c")]
    op = aten.stack.default if stack else aten.cat.default
    graph = one_node_graph(op, (parts, 1), {"c": const})
    x, r = random_box((2, 3), seed, scale, False, 1.0)

    def fn(t):
        c = row.expand(t.shape[0], -1)
        return op([c, t] if first else [t, c], 1)

    check_op(graph, fn, x, r, methods=("IBP", "CROWN", "forward"), seed=seed)


class FixedAndPerturbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.g, self.head = nn.Linear(2, 3), nn.Linear(2, 3), nn.Linear(6, 2)

    def forward(self, x, y):
        return self.head(torch.cat([torch.sigmoid(self.f(x)), torch.tanh(self.g(y))], 1))


@pytest.mark.parametrize("method", ["CROWN-IBP", "CROWN", "alpha-CROWN", "forward", "forward+backward"])
def test_two_inputs_one_fixed(method):
    """Only ``y`` perturbed: the fixed branch's values enter the bound as constants (found by fuzzing)."""
    torch.manual_seed(0)
    model = FixedAndPerturbed().eval()
    x, y = torch.randn(2, 2), torch.randn(2, 2)
    graph = boundprop.capture(model, (x, y))
    res = compute_bounds(graph, (x, y), {graph.inputs[1]: PerturbationLpNorm(0.3)}, method=method,
                         opts={"optimize_bound_args": {"iteration": 3}})
    with torch.no_grad():
        ys = y.unsqueeze(1) + 0.3 * (2 * torch.rand(2, 500, 2) - 1)
        out = model(x.unsqueeze(1).expand(-1, 500, -1).reshape(-1, 2), ys.reshape(-1, 2)).reshape(2, 500, 2)
    assert (out >= res.lower.unsqueeze(1) - 1e-5).all() and (out <= res.upper.unsqueeze(1) + 1e-5).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.integers(-3, 2), start=st.one_of(st.none(), st.integers(-6, 6)),
       end=st.one_of(st.none(), st.integers(-6, 9)), step=st.integers(1, 3), select=st.booleans(),
       shared=st.booleans())
def test_slice_and_select_backward_equal_the_generic_pullback(seed, dim, start, end, step, select, shared):
    """The dedicated backward rules of ``slice`` and ``select`` give the generic vector-Jacobian
    product's coefficients (non-batch dimensions; coefficients with a batch of 1 broadcast)."""
    from boundprop.rules.generic import AffinePullback
    from boundprop.rules.registry import Var, rules_for

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 4, 6, generator=g)
    axis = dim % 4 if dim % 4 else 1  # never the batch
    named = axis - 4 if dim < 0 else axis  # as given: negative or not
    if select:
        op, args = aten.select.int, (Var("x", x), named, (start or 0) % x.shape[axis])
    else:
        op, args = aten.slice.Tensor, (Var("x", x), named, start, end, step)
    out = op(x, *args[1:])
    if out.numel() == 0:
        return
    A = torch.randn(1 if shared else 2, 3, *out.shape[1:], generator=g)
    fast, bias = rules_for(op).affine_backward(A, args, {})
    generic = AffinePullback(op, args, {}, homogeneous=True).backward(A.expand(2, *A.shape[1:]))
    assert bias == 0.0
    torch.testing.assert_close(fast[0].expand_as(generic[0]), generic[0], rtol=0, atol=0)


def test_slice_of_the_whole_batch_passes_coefficients_through():
    """``x[:, i]`` captures as a slice of all of dim 0 (then a select): the coefficients pass unchanged."""
    from boundprop.rules.generic import AffinePullback
    from boundprop.rules.registry import Var, rules_for

    x = torch.randn(3, 4, 2)
    args = (Var("x", x), 0, 0, 2**63 - 1)
    A = torch.randn(3, 5, 4, 2)
    fast, _ = rules_for(aten.slice.Tensor).affine_backward(A, args, {})
    torch.testing.assert_close(fast[0], AffinePullback(aten.slice.Tensor, args, {}, homogeneous=True).backward(A)[0])
    assert rules_for(aten.slice.Tensor).affine_backward(A[:, :, :2], (Var("x", x), 0, 0, 2), {}) is None


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.sampled_from([1, 2, -1]), kinds=st.lists(st.booleans(), min_size=1, max_size=4),
       shared=st.booleans())
def test_cat_backward_equals_the_generic_pullback(seed, dim, kinds, shared):
    """``cat`` of perturbed parts (True) and constants (False) along a non-batch dimension: the dedicated
    backward rule gives the generic vector-Jacobian product's coefficients and constant term."""
    from boundprop.rules.generic import AffinePullback
    from boundprop.rules.registry import Var, rules_for

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, generator=g)
    parts = []
    for i, perturbed in enumerate(kinds):
        size = [2, 3, 4]
        size[dim] = 1 + i
        value = torch.randn(*size, generator=g)
        parts.append(Var(f"x{i}", value) if perturbed else value)
    if not any(kinds):
        parts.append(Var("x", x))
    args = (parts, dim)
    out = aten.cat.default([p.value if isinstance(p, Var) else p for p in parts], dim)
    A = torch.randn(1 if shared else 2, 3, *out.shape[1:], generator=g)
    fast, bias = rules_for(aten.cat.default).affine_backward(A, args, {})
    pullback = AffinePullback(aten.cat.default, args, {})
    full = A.expand(2, *A.shape[1:])
    generic = pullback.backward(full)
    assert len(fast) == len(generic)
    for f, r in zip(fast, generic):
        torch.testing.assert_close(f.expand_as(r), r, rtol=0, atol=0)
    expected = pullback.bias(full)  # 0.0 when every part is perturbed
    if all(kinds):
        assert bias == 0.0 and expected == 0.0
    else:
        torch.testing.assert_close(bias.expand_as(expected), expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(-4, 1), select=st.booleans())
def test_slice_and_select_op_level(seed, scale, select):
    """The dedicated slice/select backward rules: CROWN bounds hold at sampled points of the box."""
    if select:
        graph = one_node_graph(aten.select.int, (Ref("x"), 1, 2))
        fn = lambda t: t.select(1, 2)  # noqa: E731
    else:
        graph = one_node_graph(aten.slice.Tensor, (Ref("x"), 2, 1, 4, 2))
        fn = lambda t: t[:, :, 1:4:2]  # noqa: E731
    x, r = random_box((2, 4, 5), seed, scale, False, 1.0)
    check_op(graph, fn, x, r, methods=("IBP", "CROWN", "forward"), seed=seed)
