"""Whole-model checks over the model zoo (:mod:`boundprop.zoo`).

For every zoo model: capture (one capture per model, reused), the captured graph computes what the
model computes (batch 1 and, through the dynamic batch dimension, batch 3), every bound method is
sound (sampled, corner and PGD-pushed points via ``soundness.assert_sound``), CROWN is at least as
tight as IBP on ReLU models, and bounds are differentiable with respect to the model's parameters.

A model whose ops have no rules yet, or a method not implemented yet, xfails with the library's
own message (``UnsupportedOperatorError`` / ``NotImplementedError``); any other error fails.
"""

from __future__ import annotations

import functools
import math
import traceback
from dataclasses import dataclass

import pytest
import torch
from soundness import assert_sound

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.graph import evaluate
from boundprop.graph.capture import capture as raw_capture
from boundprop.graph.capture import check_supported
from boundprop.zoo import RELU_MODELS, ZOO

MODELS = tuple(ZOO)
METHODS = ("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN")
GRAD_METHODS = ("IBP", "CROWN-IBP", "CROWN")
EPS = 0.02
#: models whose capture is cheap enough to repeat at another batch size in the default run
CHEAP = ("mlp",)


def captured(name: str, batch: int = 1):
    """(model, graph) for a zoo model captured at ``batch``, without the support check (cached)."""
    return _captured(name, batch)


@functools.cache
def _captured(name: str, batch: int):
    factory, shape = ZOO[name]
    model = factory()
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    return model, raw_capture(model, (x,))


def inputs(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *ZOO[name][1], generator=torch.Generator().manual_seed(seed))


def supported_graph(name: str):
    """(model, graph), or xfail listing the ops without rules."""
    model, graph = captured(name)
    try:
        check_supported(graph, boundprop.is_supported)
    except NotImplementedError as error:  # UnsupportedOperatorError
        pytest.xfail(f"{type(error).__name__}: {error}")
    return model, graph


def or_xfail(fn):
    """``fn()``, turning NotImplementedError (a method or rule not written yet) into an xfail."""
    try:
        return fn()
    except NotImplementedError as error:
        pytest.xfail(f"{type(error).__name__}: {error}")


# --------------------------------------------------------------------------------------------
# the zoo itself


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_is_deterministic_eval_mode_with_nontrivial_batch_norm(name):
    factory, shape = ZOO[name]
    state = torch.random.get_rng_state()
    a, b, c = factory(), factory(), factory(seed=1)
    assert torch.equal(state, torch.random.get_rng_state()), "factories must not use the global RNG"
    assert not a.training and all(not m.training for m in a.modules())
    for (n, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), n
        if p.is_floating_point() and p.numel() > 1:
            assert not torch.equal(p, r), n
    for module in a.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            assert module.track_running_stats
            assert (module.running_mean != 0).all() and (module.running_var != 1).all()
    with torch.no_grad():
        out = a(torch.randn(2, *shape))
    assert out.dim() == 2 and out.shape[0] == 2 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# capture


@pytest.mark.parametrize("name", MODELS)
def test_graph_matches_model(name):
    """The graph evaluates to the model's output at the capture batch (1) and at batch 3."""
    model, graph = captured(name)
    for batch in (1, 3):
        x = inputs(name, batch)
        with torch.no_grad():
            expected = model(x)
            got = evaluate(graph, (x,))[graph.output]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _capture_and_bound(name: str, capture_batch: int, bound_batch: int) -> None:
    model, graph = captured(name, capture_batch)
    x = inputs(name, bound_batch, seed=2)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(evaluate(graph, (x,))[graph.output], expected, atol=1e-5, rtol=1e-5)
    or_xfail(lambda: check_supported(graph, boundprop.is_supported))
    res = compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(EPS)}, method="IBP")
    assert res.lower.shape == expected.shape
    assert bool((res.lower <= expected + 1e-5).all() and (expected <= res.upper + 1e-5).all())


@pytest.mark.parametrize("name", CHEAP)
def test_capture_batch3_bound_batch1(name):
    _capture_and_bound(name, 3, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n not in CHEAP])
def test_capture_batch3_bound_batch1_slow(name):
    _capture_and_bound(name, 3, 1)


@pytest.mark.parametrize("name", MODELS)
def test_capture_batch1_bound_batch3(name):
    _capture_and_bound(name, 1, 3)


# --------------------------------------------------------------------------------------------
# soundness

#: alpha-CROWN with two iterations (one Adam step) in the default run: every iterate is sound, and the
#: slow tests run more
FAST_OPTS = {"optimize_bound_args": {"iteration": 2}}


@dataclass(frozen=True)
class Outcome:
    """How one method fared on one model: "ok", "xfail" (not implemented) or "fail" (message)."""

    status: str
    message: str = ""
    result: object = None


def _attempt(model, graph, x, methods, **kw) -> dict[str, Outcome]:
    try:
        results = assert_sound(model, x, methods=methods, graph=graph, **kw)
    except NotImplementedError as error:
        if len(methods) == 1:
            return {methods[0]: Outcome("xfail", f"{type(error).__name__}: {error}")}
        raise
    except Exception:  # noqa: BLE001 - reported by the test of the method
        if len(methods) == 1:
            return {methods[0]: Outcome("fail", traceback.format_exc())}
        raise
    return {m: Outcome("ok", result=r) for m, r in results.items()}


@functools.cache
def sound_outcomes(name: str) -> dict[str, Outcome]:
    """Soundness of every method on one model, sharing one PGD search among the methods.

    All methods are checked in one ``assert_sound`` call; if it raises, each method is checked
    on its own so that the failure (or missing implementation) is attributed to its method.
    """
    model, graph = captured(name)
    x = inputs(name, 2)
    kw = dict(eps=EPS, n_random=128, opts=FAST_OPTS)
    try:
        return _attempt(model, graph, x, METHODS, **kw)
    except Exception:  # noqa: BLE001
        outcomes: dict[str, Outcome] = {}
        for method in METHODS:
            outcomes.update(_attempt(model, graph, x, (method,), **kw))
        return outcomes


def method_result(name: str, method: str):
    """The sound result of ``method`` on model ``name`` (xfail / fail as :func:`sound_outcomes` says)."""
    supported_graph(name)
    outcome = sound_outcomes(name)[method]
    if outcome.status == "xfail":
        pytest.xfail(outcome.message)
    if outcome.status == "fail":
        pytest.fail(f"{method} on {name}:\n{outcome.message}")
    return outcome.result


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_sound(name, method):
    res = method_result(name, method)
    assert torch.isfinite(res.lower).all() and torch.isfinite(res.upper).all()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_sound_large_eps(name, method):
    """A wider input set (more unstable neurons, wider intermediate bounds) and more samples."""
    model, graph = supported_graph(name)
    or_xfail(lambda: assert_sound(model, inputs(name, 3, seed=5), eps=0.1, methods=(method,), graph=graph,
                                  n_random=512, opts={"optimize_bound_args": {"iteration": 10}}))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_sound_l2(name):
    model, graph = supported_graph(name)
    or_xfail(lambda: assert_sound(model, inputs(name, 2, seed=6), eps=0.1, norm=2,
                                  methods=("IBP", "CROWN-IBP", "CROWN"), graph=graph, n_random=512))


# --------------------------------------------------------------------------------------------
# tightness and gradients


@pytest.mark.parametrize("name", RELU_MODELS)
def test_crown_tighter_than_ibp(name):
    """Mean width: CROWN <= CROWN-IBP and CROWN <= IBP on ReLU networks."""
    width = {m: float((method_result(name, m).upper - method_result(name, m).lower).mean())
             for m in ("IBP", "CROWN-IBP", "CROWN")}
    assert math.isfinite(width["IBP"])
    assert width["CROWN"] <= width["IBP"] + 1e-6, width
    assert width["CROWN"] <= width["CROWN-IBP"] + 1e-6, width


@pytest.mark.parametrize("name", MODELS)
def test_alpha_crown_not_looser_than_crown(name):
    """alpha-CROWN starts from CROWN and keeps the best bound: elementwise at least as tight."""
    crown = method_result(name, "CROWN")
    alpha = method_result(name, "alpha-CROWN")
    assert bool((alpha.lower >= crown.lower - 1e-5).all() and (alpha.upper <= crown.upper + 1e-5).all())


@pytest.mark.parametrize("method", GRAD_METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_bounds_differentiable_in_parameters(name, method):
    """``(upper - lower).sum()`` backpropagates finite gradients into every weight of the model."""
    model, graph = supported_graph(name)
    x = inputs(name, 2, seed=4)
    model.zero_grad(set_to_none=True)
    try:
        res = or_xfail(lambda: compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(EPS)},
                                              method=method))
        (res.upper - res.lower).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
    finally:
        model.zero_grad(set_to_none=True)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads.values())
    weights = {n: g for n, g in grads.items() if dict(model.named_parameters())[n].dim() >= 2}
    assert weights
    for n, g in weights.items():
        assert g is not None and bool((g != 0).any()), f"{method}: no gradient reaches {n}"


# --------------------------------------------------------------------------------------------
# nn.LSTM itself


@functools.cache
def native_lstm():
    from boundprop.zoo import lstm

    model = lstm(native=True)
    return model, raw_capture(model, (inputs("lstm", 1),))


def test_native_lstm_graph_matches_model():
    model, graph = native_lstm()
    x = inputs("lstm", 3)
    with torch.no_grad():
        torch.testing.assert_close(evaluate(graph, (x,))[graph.output], model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ("CROWN", "forward", "alpha-CROWN"))
def test_native_lstm_sound(method):
    """``nn.LSTM`` runs time-major inside; capture unrolls it batch first (``graph/recurrent.py``)."""
    model, graph = native_lstm()
    check_supported(graph, boundprop.is_supported)
    assert_sound(model, inputs("lstm", 2), eps=EPS, methods=(method,), graph=graph, n_random=64,
                 opts={"optimize_bound_args": {"iteration": 3}})
