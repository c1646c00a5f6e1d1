"""Host reads (:mod:`boundprop.syncs`): the counter, and that accelerator paths read only by design.

The branch-free paths an accelerator takes are run on CPU under ``device_paths()``: they must give
the bounds the CPU paths give, and read values on the host only where the module says they do
(the rows of intermediate CROWN walks, alpha-CROWN's stop test every few evaluations, one-time checks).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import boundprop
from boundprop import PerturbationLpNorm, compute_bounds
from boundprop.algorithms.alpha import _StopTest
from boundprop.syncs import STOP_TEST_EVERY, count_syncs, device_paths, may_read, read_flags, to_device, to_host
from boundprop.zoo import ZOO


def test_may_read_on_cpu_unless_device_paths():
    t = torch.zeros(3)
    assert may_read(t)
    with device_paths():
        assert not may_read(t)
        with device_paths():
            assert not may_read(t)
        assert not may_read(t)
    assert may_read(t)


def test_counter_counts_device_reads_not_host_copies():
    t = torch.tensor([0.0, 2.0, -1.0])
    original_tolist = torch.Tensor.tolist
    with count_syncs() as c:
        bool(t.any())
        float(t.sum())
        t.nonzero()
        host = to_host(t)
        assert int(host.argmax()) == 1 and bool((host * 2).any())  # reads of host copies: free
        back = to_device(host, t.device)
        int(back.argmax())  # a device tensor again
        t[t > 0]  # a bool mask as an index: its entries are found on the host
        t[torch.tensor([0, 2])]  # integer indices: no read
        t.tolist()  # a copy to the host that bypasses the dispatcher
        host.tolist()
    assert c.total == 7
    assert {op for op, _ in c.reads} == {"_local_scalar_dense", "nonzero", "to_host", "index", "tolist"}
    assert torch.Tensor.tolist is original_tolist  # restored on leaving


def test_counter_leaves_out_optimiser_step_counters():
    p = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    with count_syncs() as c:
        optimizer.step()
    assert c.total == 0


def test_read_flags_reads_once():
    a, b = torch.tensor(True), torch.tensor([1.0, 0.0]).eq(0).all()
    with count_syncs() as c:
        assert read_flags(a, False, b, True) == [True, False, False, True]
    assert c.total == 1
    assert read_flags(False, True) == [False, True]


def _models():
    torch.manual_seed(0)

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0, self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
            self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 12), torch.nn.ReLU(),
                                            torch.nn.Linear(12, 3))

        def forward(self, x):
            y = torch.relu(self.conv0(x))
            return self.head(torch.relu(self.conv1(y) + y))

    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(72, 20), torch.nn.ReLU(),
                              torch.nn.Linear(20, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    return {"mlp": (mlp.eval(), 2), "residual": (Residual().eval(), 3)}  # model, ReLU layers


_ALPHA = {"optimize_bound_args": {"iteration": 4}}


@pytest.mark.parametrize("name", ["mlp", "residual"])
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN"])
def test_device_paths_give_the_same_bounds_with_reads_only_by_design(name, method):
    """Every method gives the CPU's bounds on the GPU's branches; IBP and CROWN-IBP read nothing,
    CROWN and forward mode once per walk start, alpha-CROWN also once per few evaluations."""
    model, relu_layers = _models()[name]
    x = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    graph = boundprop.capture(model, x[:1])
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.1)}
    opts = _ALPHA if method == "alpha-CROWN" else None
    cpu = compute_bounds(graph, (x,), ptb, method=method, opts=opts)
    with device_paths(), count_syncs() as c:
        dev = compute_bounds(graph, (x,), ptb, method=method, opts=opts)
    torch.testing.assert_close(dev.lower, cpu.lower, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dev.upper, cpu.upper, rtol=1e-6, atol=1e-6)
    if method in ("IBP", "CROWN-IBP"):
        assert c.total == 0, c.reads
        return
    starts = sum(n for (_, where), n in c.reads.items() if where.startswith("algorithms/crown.py"))
    if method in ("CROWN", "forward"):  # one read per start: the rows of its walk
        assert c.total == starts <= relu_layers, c.reads
        return
    # each start's rows: once for CROWN, once for the first evaluation (kept for the later ones);
    # the stop test: at the first of the 4 evaluations of each side; a check of the window layout
    # of each start's parameters when they are made (8 on the residual network)
    stop_tests = sum(n for (op, where), n in c.reads.items() if where.startswith("algorithms/alpha.py") and op != "equal")
    checks = sum(n for (op, where), n in c.reads.items() if op == "equal")
    assert starts <= 2 * relu_layers and stop_tests == 2 and checks <= 8, c.reads
    assert c.total == starts + stop_tests + checks, c.reads


def test_alpha_crown_stops_late_on_device_paths_with_a_bound_as_tight():
    """On an accelerator alpha-CROWN reads its stop test every ``STOP_TEST_EVERY`` evaluations: a
    criterion met in between stops it at the next read, and the extra evaluations only tighten."""
    model, _ = _models()["mlp"]
    x = torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    graph = boundprop.capture(model, x[:1])
    ptb = {graph.inputs[0]: PerturbationLpNorm(0.1)}
    evaluations = []

    def criterion(bound):  # met from the second evaluation on
        evaluations.append(1)
        return torch.full((bound.shape[0], 1), len(evaluations) >= 2)

    results, counts = {}, {}
    for paths in ("cpu", "device"):
        evaluations.clear()
        with device_paths() if paths == "device" else contextlib.nullcontext():
            results[paths] = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", upper=False, opts={
                "optimize_bound_args": {"iteration": 12, "stop_criterion_func": criterion, "lr_alpha": 0.1}})
        counts[paths] = len(evaluations)
    assert counts == {"cpu": 2, "device": STOP_TEST_EVERY + 1}
    assert (results["device"].lower >= results["cpu"].lower).all()


@pytest.mark.parametrize("improved, cpu_stop", [("TTFFFFFF", 3), ("TFFTTTTT", 2), ("TTTTTTTT", None)])
def test_alpha_crown_patience_is_counted_on_the_device(improved, cpu_stop):
    """Patience 1: the CPU stops at the second evaluation in a row without improvement; the device
    paths count on the device and stop at the next read, even if a later evaluation improved."""
    def first_stop() -> int | None:
        test = _StopTest(patience=1)
        return next((i for i, flag in enumerate(improved) if test.after(i, torch.tensor(flag == "T"), False)), None)

    assert first_stop() == cpu_stop
    with device_paths(), count_syncs() as c:
        late = first_stop()
    due = None if cpu_stop is None else -(-cpu_stop // STOP_TEST_EVERY) * STOP_TEST_EVERY
    assert late == due and c.total == (late if late is not None else len(improved) - 1) // STOP_TEST_EVERY + 1


def _zoo_case(name: str):
    """A zoo model's graph, a batch of 2 inputs and an L-inf ball of 0.01 on them."""
    factory, shape = ZOO[name]
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    graph = boundprop.capture(factory(), x[:1])
    return graph, x, {graph.inputs[0]: PerturbationLpNorm(0.01)}


@pytest.mark.parametrize("name", ["transformer", "lstm", "gelu_layernorm_mlp", "bn_pool_cnn"])
@pytest.mark.parametrize("method", ["CROWN-IBP", "CROWN"])
def test_device_paths_on_other_operators(name, method):
    """Products, LayerNorm, curves (sigmoid, tanh, GELU), pooling: the same bounds, and host reads
    only for CROWN's rows and, once per call, the deferred checks that every curve was bounded."""
    graph, x, ptb = _zoo_case(name)
    with torch.no_grad():
        cpu = compute_bounds(graph, (x,), ptb, method=method)
        with device_paths(), count_syncs() as c:
            dev = compute_bounds(graph, (x,), ptb, method=method)
    torch.testing.assert_close(dev.lower, cpu.lower, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dev.upper, cpu.upper, rtol=1e-6, atol=1e-6)
    assert {where.split(":")[0] for _, where in c.reads} <= {"algorithms/crown.py", "algorithms/run.py"}, c.reads
    assert sum(n for (_, where), n in c.reads.items() if where.startswith("algorithms/run.py")) <= 1


@pytest.mark.parametrize("name", ["transformer", "bn_pool_cnn"])
def test_alpha_crown_device_paths_on_other_operators(name):
    """alpha-CROWN with its rows kept and its stop test on the device: the CPU's bounds, and host
    reads only for each start's rows (CROWN's, then at most once more for all evaluations) and one
    stop test per side."""
    graph, x, ptb = _zoo_case(name)
    opts = {"optimize_bound_args": {"iteration": 3}}
    cpu = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts=opts)
    with device_paths(), count_syncs() as c:
        dev = compute_bounds(graph, (x,), ptb, method="alpha-CROWN", opts=opts)
    torch.testing.assert_close(dev.lower, cpu.lower, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dev.upper, cpu.upper, rtol=1e-6, atol=1e-6)
    with device_paths(), count_syncs() as crown:
        compute_bounds(graph, (x,), ptb, method="CROWN")
    starts = sum(n for (_, where), n in c.reads.items() if where.startswith("algorithms/crown.py"))
    assert crown.total <= starts <= 2 * crown.total and c.total == starts + 2, c.reads


def test_checks_deferred_on_device_paths_raise_the_same_error():
    """A relaxation that cannot be bounded (1/x on an interval around 0) is refused with the error
    that names it, also where its check was deferred to the end of the call."""

    class Reciprocal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x):
            return 1.0 / self.linear(x)

    torch.manual_seed(0)
    model = Reciprocal().eval()
    x = torch.zeros(1, 3)
    graph = boundprop.capture(model, x)
    ptb = {graph.inputs[0]: PerturbationLpNorm(1.0)}
    with pytest.raises(NotImplementedError, match="no finite linear bound") as on_cpu:
        compute_bounds(graph, (x,), ptb, method="CROWN-IBP")
    with device_paths(), count_syncs() as c, pytest.raises(NotImplementedError, match="no finite linear bound") as dev:
        compute_bounds(graph, (x,), ptb, method="CROWN-IBP")
    assert str(dev.value) == str(on_cpu.value)
    assert any(where.startswith("algorithms/run.py") for _, where in c.reads), c.reads  # deferred, then rerun
    model.linear.bias.data.fill_(5.0)  # away from 0: bounded
    with device_paths(), count_syncs() as c:
        compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(0.01)}, method="CROWN-IBP")
    assert c.total == 1 and all(where.startswith("algorithms/run.py") for _, where in c.reads), c.reads
