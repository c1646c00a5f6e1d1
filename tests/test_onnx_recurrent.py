"""ONNX LSTM/GRU/RNN nodes and the time-major tensors around them (:mod:`boundprop.graph.onnx_recurrent`).

Models exported from PyTorch (and hand-built nodes for the settings PyTorch does not export) compute
what onnxruntime computes, and their bounds hold at sampled and PGD-pushed points.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from soundness import assert_sound

from boundprop.graph import UnsupportedOperatorError, evaluate
from boundprop.graph.onnx_import import import_onnx

RNG = np.random.default_rng(3)
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


class Head(nn.Module):
    """A recurrent layer on ``(batch, T, 3)`` input and a linear head on one step or the last state."""

    def __init__(self, layer: nn.Module, read: str) -> None:
        super().__init__()
        self.layer, self.read = layer, read
        width = layer.hidden_size * (2 if layer.bidirectional else 1)
        self.head = nn.Linear(width if read != "state" else layer.hidden_size, 2)

    def forward(self, x):
        if not self.layer.batch_first:
            x = x.transpose(0, 1)
        output, state = self.layer(x)
        if self.read == "state":
            h = state[0] if isinstance(state, tuple) else state
            return self.head(h[-1])
        step = output[:, -1] if self.layer.batch_first else output[-1]
        return self.head(torch.relu(step) if self.read == "relu" else step)


MODELS = {
    "lstm-last-step": lambda: Head(nn.LSTM(3, 4, batch_first=True), "output"),
    "lstm-2-bidirectional-state": lambda: Head(nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True),
                                               "state"),
    "lstm-time-major-layer": lambda: Head(nn.LSTM(3, 4), "relu"),
    "gru-bidirectional": lambda: Head(nn.GRU(3, 4, bidirectional=True, batch_first=True), "output"),
    "gru-2-state": lambda: Head(nn.GRU(3, 5, num_layers=2, batch_first=True), "state"),
    "rnn-relu": lambda: Head(nn.RNN(3, 4, nonlinearity="relu", batch_first=True), "relu"),
    "rnn-tanh-state": lambda: Head(nn.RNN(3, 4, batch_first=True), "state"),
}


def _export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["x"], output_names=["y"], opset_version=17,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString())
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", MODELS)
def test_exported_recurrences_compute_and_bound(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(3, 4, 3)
    proto = _export(model, x[:1])
    assert {n.op_type for n in proto.graph.node} & {"LSTM", "GRU", "RNN"}
    graph = import_onnx(proto)
    out = evaluate(graph, (x,))[graph.output]
    np.testing.assert_allclose(out.detach().numpy(), _run_ort(proto, x.numpy()), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(out.detach().numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert_sound(model, x[:2], eps=0.1, graph=graph, methods=("IBP", "CROWN-IBP", "CROWN"), n_random=64)


def _node_model(op: str, hidden: int, inputs: dict, attrs: dict, read: list[str], steps: int = 4, features: int = 3,
                layout: int = 0) -> onnx.ModelProto:
    """``x (batch, T, features)`` -> [Transpose (layout 0)] -> ``op`` -> the outputs in ``read``, each made batch
    first, flattened and concatenated."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, steps, features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes, inits = [], []
    source = "x"
    if not layout:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"))
        source = "xt"
    names = [source]
    keys = ("W", "R", "B", "sequence_lens", "initial_h") + (("initial_c", "P") if op == "LSTM" else ())
    for key in keys:
        if key in inputs:
            inits.append(numpy_helper.from_array(inputs[key], key))
            names.append(key)
        else:
            names.append("")
    while names[-1] == "":
        names.pop()
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    nodes.append(helper.make_node(op, names, outputs, hidden_size=hidden, layout=layout, **attrs))
    flat = []
    for out in read:
        if layout:
            nodes.append(helper.make_node("Flatten", [out], [f"{out}_f"], axis=1))
        else:  # Y (T, dirs, batch, hidden) -> (batch, T, dirs, hidden); Y_h (dirs, batch, hidden) -> (batch, ...)
            perm = [2, 0, 1, 3] if out == "Y" else [1, 0, 2]
            nodes.append(helper.make_node("Transpose", [out], [f"{out}_b"], perm=perm))
            nodes.append(helper.make_node("Flatten", [f"{out}_b"], [f"{out}_f"], axis=1))
        flat.append(f"{out}_f")
    nodes.append(helper.make_node("Concat", flat, ["y"], axis=1))
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _weights(op: str, hidden: int, dirs: int, features: int = 3) -> dict:
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    f32 = lambda *shape: RNG.normal(scale=0.5, size=shape).astype(np.float32)  # noqa: E731
    return {"W": f32(dirs, gates * hidden, features), "R": f32(dirs, gates * hidden, hidden),
            "B": f32(dirs, 2 * gates * hidden)}


CASES = {
    "lstm-peepholes-clip": ("LSTM", {"clip": 0.8}, {"P": "peepholes"}, ["Y", "Y_h", "Y_c"], 1),
    "lstm-reverse-initial-state": ("LSTM", {"direction": "reverse"}, {"initial_h": 1, "initial_c": 1},
                                   ["Y", "Y_c"], 1),
    # the cell state starts outside the clip range: onnxruntime clips the gates' inputs, not tanh(c)'s
    "lstm-clip-initial-cell": ("LSTM", {"clip": 0.3, "direction": "bidirectional"},
                               {"initial_h": 1, "initial_c": 1}, ["Y", "Y_h", "Y_c"], 2),
    "gru-not-linear-before-reset-bidirectional": ("GRU", {"direction": "bidirectional", "linear_before_reset": 0},
                                                  {}, ["Y", "Y_h"], 2),
    "gru-linear-before-reset": ("GRU", {"linear_before_reset": 1}, {}, ["Y_h"], 1),
    "rnn-relu-bidirectional": ("RNN", {"direction": "bidirectional", "activations": ["Relu", "Relu"]}, {},
                               ["Y"], 2),
}


@pytest.mark.parametrize("case", CASES)
def test_node_settings_match_onnxruntime_and_bound(case):
    op, attrs, extra, read, dirs = CASES[case]
    hidden = 3
    inputs = _weights(op, hidden, dirs)
    if extra.get("P"):
        inputs["P"] = RNG.normal(scale=0.5, size=(dirs, 3 * hidden)).astype(np.float32)
    for key in ("initial_h", "initial_c"):
        if key in extra:
            inputs[key] = RNG.normal(size=(dirs, 1, hidden)).astype(np.float32)
    model = _node_model(op, hidden, inputs, attrs, read)
    graph = import_onnx(model)
    x = torch.from_numpy(RNG.uniform(-1, 1, size=(3, 4, 3)).astype(np.float32))
    expected = np.concatenate([_run_ort(model, x[i:i + 1].numpy()) for i in range(3)])
    out = evaluate(graph, (x,))[graph.output].detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    def run(points):
        return torch.from_numpy(np.concatenate([_run_ort(model, p[None].numpy()) for p in points]))

    class Reference(nn.Module):  # onnxruntime as the model the sampled points are checked against
        def forward(self, points):
            return run(points.detach())

    assert_sound(Reference(), x[:1], eps=0.2, graph=graph, methods=("IBP", "CROWN"), n_random=64, pgd=False)


def test_layout_one_matches_the_time_major_node():
    """``layout = 1`` (batch first) gives the same values as the time-major node, without a Transpose."""
    inputs = _weights("LSTM", 3, 1)
    x = torch.from_numpy(RNG.uniform(-1, 1, size=(2, 4, 3)).astype(np.float32))
    time_major, batch_first = (import_onnx(_node_model("LSTM", 3, inputs, {}, ["Y", "Y_h"], layout=k)) for k in (0, 1))
    a = evaluate(time_major, (x,))[time_major.output]
    b = evaluate(batch_first, (x,))[batch_first.output]
    torch.testing.assert_close(a, b)


def test_unsupported_settings_and_time_major_values_named():
    inputs = _weights("LSTM", 3, 1)
    with pytest.raises(UnsupportedOperatorError, match="input_forget"):
        import_onnx(_node_model("LSTM", 3, inputs, {"input_forget": 1}, ["Y_h"]))
    with pytest.raises(UnsupportedOperatorError, match="sequence_lens"):
        import_onnx(_node_model("LSTM", 3, {**inputs, "sequence_lens": np.array([2], dtype=np.int32)}, {}, ["Y_h"]))
    with pytest.raises(UnsupportedOperatorError, match="activations"):
        import_onnx(_node_model("LSTM", 3, inputs, {"activations": ["Sigmoid", "Relu", "Tanh"]}, ["Y_h"]))
    # an op other than the shape ops on the time-major output: named, with the node that moved the batch
    model = _node_model("LSTM", 3, inputs, {}, ["Y_h"])
    model.graph.node.insert(2, helper.make_node("Relu", ["Y_h"], ["Y_h_relu"], name="relu_on_time_major"))
    for node in model.graph.node[3:]:
        node.input[:] = ["Y_h_relu" if i == "Y_h" else i for i in node.input]
    with pytest.raises(UnsupportedOperatorError, match="Relu of a tensor whose batch dimension is not first"):
        import_onnx(model)


def _chain(nodes, inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


CHAINS = {
    "transpose-there-and-back": ([helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 3, 1]),
                                  helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0, 3, 2])], []),
    "gather-unsqueeze-slice-squeeze-concat": (
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 0, 3]),  # (2, 3, B, 4)
         helper.make_node("Gather", ["t", "two"], ["g"], axis=1),  # (2, B, 4)
         helper.make_node("Unsqueeze", ["g", "zero"], ["u"]),  # (1, 2, B, 4)
         helper.make_node("Slice", ["u", "one", "two1", "one"], ["s"]),  # (1, 1, B, 4)
         helper.make_node("Squeeze", ["s", "zero"], ["q"]),  # (1, B, 4)
         helper.make_node("Concat", ["q", "q"], ["c"], axis=2),  # (1, B, 8)
         helper.make_node("Transpose", ["c"], ["y"], perm=[1, 0, 2])],
        [_i64("two", 2), _i64("zero", [0]), _i64("one", [1]), _i64("two1", [2])]),
    "reshape-leaves-and-unsqueeze-before-batch": (
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 0, 3]),  # (2, 3, B, 4)
         helper.make_node("Reshape", ["t", "shape"], ["r"]),  # (2, 3, B, 2, 2)
         helper.make_node("Unsqueeze", ["r", "two"], ["u"]),  # (2, 3, 1, B, 2, 2)
         helper.make_node("Concat", ["u", "u"], ["c"], axis=0),  # (4, 3, 1, B, 2, 2)
         helper.make_node("Gather", ["c", "idx"], ["g"], axis=5),  # (4, 3, 1, B, 2, 2) picked
         helper.make_node("Transpose", ["g"], ["y"], perm=[3, 1, 0, 5, 2, 4])],
        [_i64("shape", [0, 0, 0, 2, 2]), _i64("two", [2]), _i64("idx", [1, 0])]),
}


@pytest.mark.parametrize("name", CHAINS)
def test_shape_ops_on_time_major_values_match_onnxruntime(name):
    nodes, inits = CHAINS[name]
    model = _chain(nodes, inits)
    graph = import_onnx(model)
    x = torch.from_numpy(RNG.uniform(-1, 1, size=(3, 2, 3, 4)).astype(np.float32))
    expected = np.concatenate([_run_ort(model, x[i:i + 1].numpy()) for i in range(3)])
    np.testing.assert_array_equal(evaluate(graph, (x,))[graph.output].detach().numpy(), expected)
    if name == "transpose-there-and-back":  # one permute of the input, no steps
        assert [n.target for n in graph.nodes] == [torch.ops.aten.permute.default]
