"""Max/min rules: the max relaxation, amax/amin reductions, element-wise maximum/minimum, models."""

import math

import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st
from op_bounds import check_op, one_node_graph, random_box
from soundness import assert_sound

from boundprop.graph.ir import Ref
from boundprop.rules.maximum import max_relaxation

aten = torch.ops.aten


@settings(max_examples=80, deadline=None)
@example(k=1, seed=30434, scale=2.7734375, degenerate=False, spread=3.0, padded=False)  # float32 cancellation
@given(k=st.integers(1, 6), seed=st.integers(0, 2**16), scale=st.floats(-7, 3), degenerate=st.booleans(),
       spread=st.sampled_from([0.3, 3.0, 30.0]), padded=st.booleans())
def test_max_relaxation_sound(k, seed, scale, degenerate, spread, padded):
    x, r = random_box((4, k), seed, scale, degenerate, spread)
    lower, upper = x - r, x + r
    gen = torch.Generator().manual_seed(seed)
    valid = torch.ones_like(lower, dtype=torch.bool)
    if padded:
        valid = torch.rand(lower.shape, generator=gen) < 0.7
        valid[:, 0] = True
        lower, upper = lower.masked_fill(~valid, -math.inf), upper.masked_fill(~valid, -math.inf)
    rel = max_relaxation(lower, upper, valid)
    lo_f, hi_f = torch.where(valid, lower, 0.0), torch.where(valid, upper, 0.0)
    pts = lo_f + torch.rand((3000, *lower.shape), generator=gen) * (hi_f - lo_f)
    corners = torch.where(torch.rand((300, *lower.shape), generator=gen) < 0.5, lo_f, hi_f)
    pts = torch.cat([pts, corners])
    f = torch.where(valid, pts, -math.inf).amax(-1)
    vl = (rel.wl * pts).sum(-1) + rel.bl
    vu = (rel.wu * pts).sum(-1) + rel.bu
    assert not torch.isnan(vl).any() and not torch.isnan(vu).any()
    assert (rel.wl[~valid] == 0).all() and (rel.wu[~valid] == 0).all()
    tol = 1e-5 * (1 + f.abs() + pts.abs().amax(-1))
    assert (vl <= f + tol).all() and (vu >= f - tol).all()
    # the upper weights form a convex combination or less (exactly 1 unless T = max l already has sum <= 1)
    assert (rel.wu >= 0).all() and (rel.wu.sum(-1) <= 1 + 1e-3).all()


def test_dominated_is_exact_and_relu_is_the_chord():
    rel = max_relaxation(torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([[4.0, 2.5, 3.0]]))
    assert torch.equal(rel.wl, torch.tensor([[1.0, 0.0, 0.0]])) and torch.equal(rel.wu, rel.wl)
    assert float(rel.bu) == 0.0
    # max(x, 0), x in [-1, 3]: the triangle relaxation's chord 3/4 (x + 1)
    rel = max_relaxation(torch.tensor([[-1.0, 0.0]]), torch.tensor([[3.0, 0.0]]))
    x = torch.linspace(-1, 3, 9)
    up = rel.wu[0, 0] * x + rel.bu[0]
    assert torch.allclose(up, 0.75 * (x + 1))


def test_infinite_bounds_give_no_nan():
    rel = max_relaxation(torch.tensor([[-math.inf, 0.0]]), torch.tensor([[1.0, math.inf]]))
    assert not torch.isnan(rel.wu).any() and float(rel.bu) == math.inf and (rel.wu == 0).all()


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(-6, 1.5), degenerate=st.booleans(),
       dims=st.sampled_from([[1], [2], [1, 3], [-1], [2, 3], [1, 2, 3]]), keepdim=st.booleans(), is_min=st.booleans())
@example(seed=0, scale=0.0, degenerate=False, dims=[1, 2, 3], keepdim=False, is_min=False)
def test_reductions_op_level(seed, scale, degenerate, dims, keepdim, is_min):
    """Over some of the non-batch dimensions, or all of them (one entry per example left)."""
    target = aten.amin.default if is_min else aten.amax.default
    reduce = torch.amin if is_min else torch.amax
    graph = one_node_graph(target, (Ref("x"), dims, keepdim))
    x, r = random_box((2, 3, 2, 4), seed, scale, degenerate, 1.0)
    check_op(graph, lambda t: reduce(t, dims, keepdim), x, r, methods=("IBP", "CROWN"), seed=seed)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(-6, 1.5), degenerate=st.booleans(), is_min=st.booleans(),
       constant=st.sampled_from([None, 0.0, "tensor"]))
def test_elementwise_op_level(seed, scale, degenerate, is_min, constant):
    """``maximum(x[:, 0], x[:, 1])`` through slicing, or ``maximum(x, c)`` with a constant ``c``."""
    target = aten.minimum.default if is_min else aten.maximum.default
    op = torch.minimum if is_min else torch.maximum
    x, r = random_box((2, 2, 5), seed, scale, degenerate, 1.0)
    if constant is None:
        from boundprop.graph.ir import Graph, Node

        nodes = (Node("a", aten.select.int, (Ref("x"), 1, 0)), Node("b", aten.select.int, (Ref("x"), 1, 1)),
                 Node("y", target, (Ref("a"), Ref("b"))))
        graph = Graph(nodes, ("x",), {}, "y")
        fn = lambda t: op(t[:, 0], t[:, 1])  # noqa: E731
    elif constant == "tensor":
        c = torch.randn(1, 5)
        graph = one_node_graph(target, (Ref("x"), Ref("c")), {"c": c})
        fn = lambda t: op(t, c)  # noqa: E731
    else:
        graph = one_node_graph(target, (Ref("x"), torch.tensor(constant)))
        fn = lambda t: op(t, torch.tensor(constant))  # noqa: E731
    check_op(graph, fn, x, r, methods=("IBP", "CROWN"), seed=seed)


def test_unsupported_batch_reduction():
    graph = one_node_graph(aten.amax.default, (Ref("x"), [0], False))
    x = torch.randn(2, 3)
    try:
        check_op(graph, lambda t: t.amax(0), x, torch.full_like(x, 0.1))
    except NotImplementedError:
        return
    raise AssertionError("a max over the batch must be refused")


class MaxModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.c = nn.Linear(4, 12)
        self.o = nn.Linear(6 + 3, 2)

    def forward(self, x):
        m = torch.maximum(self.a(x), self.b(x))  # two perturbed tensors
        r = torch.max(self.c(x).reshape(-1, 4, 3), dim=1)[0]  # -> amax over dim 1
        return self.o(torch.cat([torch.relu(m) - torch.minimum(self.a(x), self.b(x)), r], 1))


def test_max_model_sound_and_crown_tighter():
    torch.manual_seed(0)
    model = MaxModel()
    x = torch.randn(2, 4)
    for eps in (0.05, 0.5):
        res = assert_sound(model, x, eps=eps)
        w = {m: float((r.upper - r.lower).mean()) for m, r in res.items()}
        assert w["CROWN"] <= w["IBP"] + 1e-6, w
