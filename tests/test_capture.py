"""Capture (:mod:`boundprop.graph.capture`) of models beyond plain ``nn.Sequential`` stacks.

Checks: one error listing every unsupported op with its module path and source line; several
inputs with only some perturbed; parameters, buffers and constants (read live from the module);
tuple outputs rejected clearly; in-place ops; the make_fx fallback when torch.export fails; an
identity model; BatchNorm captured in eval mode (running statistics) without touching the module.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from soundness import assert_sound, box_points

import boundprop
from boundprop import PerturbationLpNorm, UnsupportedOperatorError, compute_bounds
from boundprop.graph import evaluate

THIS_FILE = __file__.rsplit("/", 1)[-1]


def line_of(marker: str) -> int:
    """The line number (1-based) of the one line of this file that ends with the comment ``# marker``."""
    with open(__file__) as f:
        lines = [i + 1 for i, line in enumerate(f) if line.rstrip().endswith(f"# {marker}")]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def graph_output(graph, *inputs):
    with torch.no_grad():
        return evaluate(graph, inputs)[graph.output]


# --------------------------------------------------------------------------------------------
# unsupported ops: one error that lists all of them


class Rounder(nn.Module):
    def forward(self, x):
        return torch.fmod(x * 4, 1.5)  # MARK-fmod


class Sorter(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values  # MARK-sort


class TwoUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rounder = Rounder()
        self.sorter = Sorter()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.head(self.rounder(h) + self.sorter(h) + torch.lgamma(h + 1))  # MARK-lgamma


def test_unsupported_ops_listed_together_with_module_and_line():
    for op in (torch.ops.aten.fmod.Scalar, torch.ops.aten.lgamma.default, torch.ops.aten.sort.default):
        assert not boundprop.is_supported(op), f"{op} is supported now: pick another unsupported op"
    with pytest.raises(UnsupportedOperatorError) as info:
        boundprop.capture(TwoUnsupported(), torch.randn(1, 4))
    message = str(info.value)
    for op, module, marker in (("fmod.Scalar", "rounder (Rounder)", "MARK-fmod"),
                               ("sort", "sorter (Sorter)", "MARK-sort"),
                               ("lgamma", "", "MARK-lgamma")):
        lines = [line for line in message.splitlines() if line.strip().startswith(f"- {op} ")]
        assert lines, f"{op} missing from:\n{message}"
        line = lines[0]
        assert module in line, line
        assert f'{THIS_FILE}", line {line_of(marker)}' in line, line
    assert isinstance(info.value, NotImplementedError)
    ops = {op for op, _ in info.value.entries}
    assert {"fmod.Scalar", "sort", "lgamma"} <= ops


def test_unsupported_op_on_constant_path_is_fine():
    """An unsupported op applied to parameters only (never perturbed) does not block capture."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + torch.round(self.fc.bias * 10) / 10

    model = M().eval()
    x = torch.randn(2, 3)
    graph = boundprop.capture(model, x)
    torch.testing.assert_close(graph_output(graph, x), model(x).detach())
    assert_sound(model, x, eps=0.1, graph=graph, pgd=False)


class Casts(nn.Module):
    def __init__(self, lossy: bool):
        super().__init__()
        self.fc, self.lossy = nn.Linear(3, 3), lossy

    def forward(self, x):
        h = self.fc(x) * 3
        if self.lossy:
            return h.half().float() + h.bool().float()
        return h.to(torch.int64).float() + h.double().float() + self.fc.bias.half().float()


def test_casts_of_perturbed_values():
    """A cast to an integer type truncates (it was once a plain copy: CROWN's bounds then excluded the
    model's value); casts to bool and float16 are reported; a float16 cast of a constant is fine."""
    x = torch.randn(3, 3)
    model = Casts(lossy=False).eval()
    graph = boundprop.capture(model, x)
    assert torch.ops.aten.trunc.default in [n.target for n in graph.nodes]
    assert_sound(model, x, eps=0.3, graph=graph, methods=("IBP", "CROWN-IBP", "CROWN", "forward"))
    with pytest.raises(UnsupportedOperatorError) as info:
        boundprop.capture(Casts(lossy=True).eval(), x)
    assert [op for op, _ in info.value.entries] == ["lossy_cast", "lossy_cast"]


class BatchMixing(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how, self.fc = how, nn.Linear(3, 3)

    def forward(self, x):
        h = self.fc(x)
        if self.how == "mean":  # statistics over the batch
            return h - h.mean(0, keepdim=True)
        if self.how == "transpose":
            return torch.relu(self.fc.weight @ h.t()).t()
        return h.reshape(-1).relu().reshape(x.shape[0], -1)  # the batch folded into the features


@pytest.mark.parametrize("how", ["mean", "transpose", "fold"])
def test_ops_that_move_or_mix_the_batch_are_reported(how):
    """Bounds are per example: an op whose output does not keep the batch first, alone, is reported (on
    ``h - h.mean(0)`` CROWN-IBP once returned a lower bound above the model's value)."""
    with pytest.raises(UnsupportedOperatorError, match="batch dimension") as info:
        boundprop.capture(BatchMixing(how).eval(), torch.randn(3, 3))
    assert len(info.value.entries) == 1


# --------------------------------------------------------------------------------------------
# several inputs, some perturbed


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa = nn.Linear(3, 4)
        self.fb = nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, a, b):
        return self.head(torch.relu(self.fa(a) + self.fb(b)))


def _check_two_inputs(model, graph, a, b, perturbed: dict, methods=("IBP", "CROWN-IBP", "CROWN")):
    """Bounds with ``perturbed`` ({index: eps}) must contain the outputs at points of the product box."""
    values = (a, b)
    ptb = {graph.inputs[i]: PerturbationLpNorm(eps) for i, eps in perturbed.items()}
    results = {m: compute_bounds(graph, values, ptb, method=m) for m in methods}
    for k in range(a.shape[0]):
        samples = []
        for i, v in enumerate(values):
            if i in perturbed:
                pts = box_points(v[k] - perturbed[i], v[k] + perturbed[i], n_random=200)
                samples.append(pts[torch.randint(len(pts), (400,), generator=torch.Generator().manual_seed(i))])
            else:
                samples.append(v[k].expand(400, *v.shape[1:]))
        with torch.no_grad():
            out = model(*samples)
        for m, r in results.items():
            assert bool((out >= r.lower[k] - 1e-5).all()), m
            assert bool((out <= r.upper[k] + 1e-5).all()), m
    return results


def test_multiple_inputs_only_some_perturbed():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    a, b = torch.randn(3, 3), torch.randn(3, 2)
    graph = boundprop.capture(model, (a[:1], b[:1]))
    assert len(graph.inputs) == 2
    torch.testing.assert_close(graph_output(graph, a, b), model(a, b).detach())
    only_a = _check_two_inputs(model, graph, a, b, {0: 0.2})
    only_b = _check_two_inputs(model, graph, a, b, {1: 0.2})
    both = _check_two_inputs(model, graph, a, b, {0: 0.2, 1: 0.2})
    for m in only_a:
        # perturbing more inputs cannot give a narrower bound than perturbing one of them
        assert bool(((both[m].upper - both[m].lower) >= (only_a[m].upper - only_a[m].lower) - 1e-5).all())
        assert bool(((both[m].upper - both[m].lower) >= (only_b[m].upper - only_b[m].lower) - 1e-5).all())
    # no perturbation at all: the bounds are the output itself
    exact = compute_bounds(graph, (a, b), {}, method="CROWN")
    torch.testing.assert_close(exact.lower, model(a, b).detach())


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, mask):
        return self.fc(x) * (mask > 0).float()


def test_unperturbed_input_through_ops_without_rules():
    """An input never perturbed may go through ops without rules (here ``>``) when the graph is
    captured without the support check; compute_bounds evaluates that branch concretely."""
    from boundprop.graph.capture import capture as raw_capture

    model = Masked().eval()
    x, mask = torch.randn(2, 3), torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    graph = raw_capture(model, (x, mask))
    torch.testing.assert_close(graph_output(graph, x, mask), model(x, mask).detach())
    for method in ("IBP", "CROWN"):
        res = compute_bounds(graph, (x, mask), {graph.inputs[0]: PerturbationLpNorm(0.1)}, method=method)
        assert bool((res.lower[mask < 0] == 0).all() and (res.upper[mask < 0] == 0).all())
        assert bool((res.lower[mask > 0] < res.upper[mask > 0]).all())


@pytest.mark.xfail(raises=UnsupportedOperatorError, strict=False,
                   reason="boundprop.capture cannot know which inputs will be perturbed, so it checks the ops "
                          "downstream of every input")
def test_public_capture_accepts_unsupported_ops_on_an_input_that_may_stay_fixed():
    model = Masked().eval()
    boundprop.capture(model, (torch.randn(2, 3), torch.ones(2, 2)))


# --------------------------------------------------------------------------------------------
# parameters, buffers, constants


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("shift", torch.tensor([0.1, -0.2, 0.3]))
        self.register_buffer("scale", torch.tensor([2.0, 1.0, 0.5]), persistent=False)
        self.factor = 1.5  # a Python constant

    def forward(self, x):
        offset = torch.tensor([1.0, 2.0, 3.0])  # a tensor constant created in forward
        return torch.relu(self.fc(x) + self.shift) * self.scale * self.factor + offset


def test_buffers_and_constants():
    torch.manual_seed(0)
    model = WithBuffers().eval()
    x = torch.randn(2, 3)
    graph = boundprop.capture(model, x)
    kinds = {src.qualname: src.kind for src in graph.params.values()}
    assert kinds["fc.weight"] == "parameter" and kinds["shift"] == "buffer"
    assert "constant" in kinds.values()
    torch.testing.assert_close(graph_output(graph, x), model(x).detach())
    assert_sound(model, x, eps=0.2, graph=graph)
    # values are read live from the module: later in-place updates are seen without re-capture
    with torch.no_grad():
        model.shift += 1.0
        model.scale *= 2.0
        model.fc.weight.mul_(0.5)
    torch.testing.assert_close(graph_output(graph, x), model(x).detach())
    assert_sound(model, x, eps=0.2, graph=graph, pgd=False)
    # so is a persistent buffer re-assigned as a new tensor
    model.shift = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(graph_output(graph, x), model(x).detach())


# --------------------------------------------------------------------------------------------
# outputs, in-place ops, identity


def test_tuple_output_rejected_with_clear_message():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return y, y * 2

    with pytest.raises((TypeError, RuntimeError), match="single tensor") as info:
        boundprop.capture(Pair(), torch.randn(1, 3))
    assert "returns 2 values" in str(info.value)


class InPlace(nn.Module):
    def __init__(self, slice_write: bool = False):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.slice_write = slice_write

    def forward(self, x):
        h = self.fc(x)
        h += 1.0
        h.mul_(0.5)
        if self.slice_write:
            h[:, 0] = 0.0  # in-place write into a slice (slice_scatter after functionalisation)
        h.relu_()  # last, so that autograd (used by the PGD of the soundness check) still works
        return self.head(h)


@pytest.mark.parametrize("slice_write", [False, True])
def test_in_place_ops(slice_write):
    torch.manual_seed(0)
    model = InPlace(slice_write).eval()
    x = torch.randn(2, 4)
    try:
        graph = boundprop.capture(model, x)
    except UnsupportedOperatorError as error:
        pytest.xfail(str(error))
    torch.testing.assert_close(graph_output(graph, x), model(x).detach())
    assert_sound(model, x, eps=0.3, graph=graph)


def test_identity_model():
    x = torch.randn(2, 5)
    graph = boundprop.capture(nn.Identity(), x)
    torch.testing.assert_close(graph_output(graph, x), x)
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        res = compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(0.1)}, method=method)
        torch.testing.assert_close(res.lower, x - 0.1)
        torch.testing.assert_close(res.upper, x + 0.1)
    res = compute_bounds(graph, (x,), {graph.inputs[0]: PerturbationLpNorm(0.1, norm=2)}, method="CROWN")
    torch.testing.assert_close(res.upper - res.lower, torch.full_like(x, 0.2))


# --------------------------------------------------------------------------------------------
# export failure -> make_fx


class NumpyScaled(nn.Module):
    """Scales by a factor computed in numpy from a weight: torch.export rejects ``.numpy()`` on its
    fake tensors; make_fx runs the real tensors and bakes the factor in as a constant."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        factor = float(abs(self.fc.weight.detach().numpy()).max())
        return self.head(torch.relu(self.fc(x)) / factor)


def test_make_fx_fallback_when_export_fails():
    torch.manual_seed(0)
    model = NumpyScaled().eval()
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = boundprop.capture(model, x)
    assert any("make_fx" in str(w.message) for w in caught), [str(w.message) for w in caught]
    torch.testing.assert_close(graph_output(graph, x), model(x).detach())
    res = assert_sound(model, x, eps=0.2, graph=graph)
    assert res["CROWN"].lower.shape == (2, 2)


def test_data_dependent_control_flow_is_reported():
    """Python control flow on an input's value can be captured by neither path: a clear error."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(RuntimeError, match="could not capture"):
        boundprop.capture(Branchy(), torch.ones(1, 3))


# --------------------------------------------------------------------------------------------
# BatchNorm in eval mode


def test_batch_norm_uses_running_stats_and_leaves_module_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.3, 3)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 0.5)
    model.train()
    stats = [t.clone() for t in model.buffers()]
    x = torch.randn(4, 2, 4, 4)
    graph = boundprop.capture(model, x)
    assert model.training, "capture must restore the training flag"
    for before, after in zip(stats, model.buffers()):
        assert torch.equal(before, after), "capture must not update BatchNorm statistics"
    got = graph_output(graph, x)
    with torch.no_grad():
        eval_out = model.eval()(x)
        train_out = model.train()(x)  # batch statistics (and a running-stat update we do not care about)
    torch.testing.assert_close(got, eval_out)
    assert not torch.allclose(got, train_out, atol=1e-3), "capture must use running statistics"
    model.eval()
    assert_sound(model, x[:2], eps=0.05, graph=graph)

