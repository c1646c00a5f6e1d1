"""Pooling rules: max_pool2d (IBP exact, sound backward with overlapping windows, -inf padding,
ceil_mode, dilation), avg/adaptive-avg pooling fast paths equal to the generic vector-Jacobian
product, a CNN with max and average pooling, and nearest/bilinear upsampling."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from op_bounds import check_op, one_node_graph, random_box
from soundness import assert_sound

from boundprop.domains import Interval
from boundprop.graph.ir import Ref
from boundprop.rules import Var, rules_for
from boundprop.rules.generic import AffinePullback
from boundprop.rules.pooling import avg_pool2d_interval

aten = torch.ops.aten

POOLS = [  # kernel, stride, padding, dilation, ceil_mode
    ([2, 2], [2, 2], [0, 0], [1, 1], False),
    ([3, 3], [1, 1], [1, 1], [1, 1], False),
    ([3, 3], [2, 2], [1, 1], [1, 1], False),
    ([2, 3], [1, 2], [1, 0], [1, 1], False),
    ([2, 2], [2, 2], [0, 0], [1, 1], True),
    ([3, 3], [2, 2], [1, 1], [1, 1], True),
    ([2, 2], [1, 1], [1, 1], [2, 2], False),
]


@settings(max_examples=20, deadline=None)
@given(pool=st.sampled_from(POOLS), seed=st.integers(0, 2**16), scale=st.floats(-6, 1.5),
       degenerate=st.booleans(), size=st.sampled_from([(5, 5), (6, 7)]))
def test_max_pool2d_op_level(pool, seed, scale, degenerate, size):
    kernel, stride, padding, dilation, ceil_mode = pool
    graph = one_node_graph(aten.max_pool2d.default, (Ref("x"), kernel, stride, padding, dilation, ceil_mode))
    fn = lambda t: torch.nn.functional.max_pool2d(t, kernel, stride, padding, dilation, ceil_mode)  # noqa: E731
    x, r = random_box((2, 2, *size), seed, scale, degenerate, 1.0)
    res = check_op(graph, fn, x, r, methods=("IBP", "CROWN"), seed=seed, n_samples=256)
    # IBP is exact for the identity spec; the pooled ends are attained
    ibp = rules_for(aten.max_pool2d.default).interval((Interval(x - r, x + r), kernel, stride, padding, dilation,
                                                         ceil_mode), {})
    assert torch.equal(ibp.lower, fn(x - r)) and torch.equal(ibp.upper, fn(x + r))
    assert res["CROWN"].lower.shape == (2, 3)


def test_max_pool2d_short_args_and_dominated_windows_exact():
    """Default stride/padding; with well separated values every window is dominated: CROWN exact."""
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) * 10
    r = torch.full_like(x, 0.1)
    graph = one_node_graph(aten.max_pool2d.default, (Ref("x"), [2, 2]))
    fn = lambda t: torch.nn.functional.max_pool2d(t, 2)  # noqa: E731
    res = check_op(graph, fn, x, r, methods=("IBP", "CROWN"), n_spec=3, seed=1)
    # each output is one input entry: the exact width of C y is sum_j |C_j| * 0.2
    C = torch.randn((2, 3, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    exact = C.abs().flatten(2).sum(-1) * 0.2
    assert torch.allclose(res["CROWN"].upper - res["CROWN"].lower, exact, atol=1e-4)


AVG = [  # kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
    ([2, 2], [2, 2], [0, 0], False, True, None),
    ([3, 3], [2, 2], [1, 1], True, False, None),
    ([3, 2], [1, 2], [1, 1], False, True, None),
    ([2, 2], [2, 2], [1, 0], True, True, 3),
    ([2, 2], [1, 1], [0, 0], False, True, -2),
]


def test_avg_pool_fast_paths_equal_generic_vjp():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    A = torch.randn(2, 4, *torch.nn.functional.avg_pool2d(x, 2).shape[1:])
    cases = [(aten.avg_pool2d.default, tuple(params)) for params in AVG]
    cases += [(aten.adaptive_avg_pool2d.default, ([2, 3],)), (aten.adaptive_avg_pool2d.default, ([4, 4],))]
    for target, params in cases:
        args = (Var("x", x), *params)
        out = target(x, *params)
        A = torch.randn(2, 4, *out.shape[1:])
        fast, bias = rules_for(target).affine_backward(A, args, {})
        generic = AffinePullback(target, args, {}, homogeneous=True).backward(A)
        assert bias == 0.0
        assert torch.allclose(fast[0], generic[0], atol=1e-6), (target, params)


def test_avg_pool_interval_exact_with_negative_divisor():
    x = torch.randn(2, 2, 4, 4)
    r = torch.rand_like(x)
    for params in AVG:
        out = avg_pool2d_interval((Interval(x - r, x + r), *params), {})
        pts = x - r + torch.rand(400, *x.shape) * 2 * r
        vals = torch.stack([aten.avg_pool2d.default(p, *params) for p in pts])
        assert (vals >= out.lower - 1e-5).all() and (vals <= out.upper + 1e-5).all()
        assert (out.lower <= out.upper).all()


@settings(max_examples=8, deadline=None)
@given(params=st.sampled_from(AVG), seed=st.integers(0, 2**16), scale=st.floats(-5, 1))
def test_avg_pool_op_level(params, seed, scale):
    graph = one_node_graph(aten.avg_pool2d.default, (Ref("x"), *params))
    x, r = random_box((2, 2, 5, 5), seed, scale, True, 1.0)
    check_op(graph, lambda t: aten.avg_pool2d.default(t, *params), x, r, methods=("IBP", "CROWN"), seed=seed)


class PoolNet(nn.Module):
    def __init__(self, kernel, stride, padding):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(kernel, stride, padding)
        self.c2 = nn.Conv2d(3, 4, 2)
        self.avg = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.pool(torch.relu(self.c1(x)))
        h = self.gap(self.avg(torch.relu(self.c2(h))))
        return self.fc(h.flatten(1))


def test_cnn_with_pooling_sound_and_crown_tighter():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 6)
    for kernel, stride, padding in ((2, 2, 0), (3, 1, 1), (3, 2, 1)):
        model = PoolNet(kernel, stride, padding)
        res = assert_sound(model, x, eps=0.05, n_random=64)
        w = {m: float((r.upper - r.lower).mean()) for m, r in res.items()}
        assert w["CROWN"] <= w["IBP"] + 1e-6, (kernel, stride, padding, w)


UPSAMPLE_OPS = [  # op, args after x
    (aten.upsample_nearest2d.vec, ([7, 10], None)),
    (aten._upsample_nearest_exact2d.vec, (None, [2.0, 1.5])),
    (aten.upsample_bilinear2d.vec, ([9, 8], False, None)),
    (aten.upsample_bilinear2d.vec, (None, True, [2.0, 2.0])),
]


@settings(max_examples=8, deadline=None)
@given(case=st.sampled_from(UPSAMPLE_OPS), seed=st.integers(0, 2**16), scale=st.floats(-5, 1))
def test_upsample_op_level(case, seed, scale):
    """Nearest and (bi)linear resampling are linear with non-negative weights: IBP on the ends is exact."""
    op, params = case
    graph = one_node_graph(op, (Ref("x"), *params))
    x, r = random_box((2, 2, 4, 5), seed, scale, True, 1.0)
    check_op(graph, lambda t: op(t, *params), x, r, methods=("IBP", "CROWN", "forward"), seed=seed)


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "nearest-exact"])
def test_cnn_with_upsampling_sound(mode):
    """A decoder-style CNN (upsampling between convolutions) under every method."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2, mode=mode),
                          nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    res = assert_sound(model, torch.randn(2, 2, 4, 4), eps=0.1, n_random=64,
                       methods=("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN"),
                       opts={"optimize_bound_args": {"iteration": 3}})
    w = {m: float((r.upper - r.lower).mean()) for m, r in res.items()}
    assert w["CROWN"] <= w["CROWN-IBP"] <= w["IBP"] + 1e-6, w
