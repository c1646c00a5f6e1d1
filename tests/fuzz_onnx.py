"""The ONNX kinds of the soundness fuzzer (:mod:`fuzz`): the importer against onnxruntime, then bounds.

* ``onnx``: a :func:`fuzz.random_model` exported by ``torch.onnx.export`` (float32, dynamic batch) and
  imported: the imported graph must compute what onnxruntime computes (float32) and what the torch
  model computes (float64); its bounds are then checked as in ``graph``.
* ``onnxops``: a chain of ONNX nodes built directly, with the attributes torch's exporter never
  writes (``auto_pad``, asymmetric pads, ``ceil_mode``, ``count_include_pad``, ``Gemm``'s ``alpha``,
  ``beta`` and ``transB``, activation parameters, negative slice steps, ``Split`` into uneven
  parts...), and LSTM, GRU and RNN nodes with random settings (layouts, directions, ``clip``,
  peepholes, initial states) on sequences. Each node is kept only if onnxruntime accepts it. Same
  checks.

Both run with float32 as the default dtype (see :func:`fuzz.run`) and check bounds in float64.
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from fuzz import check_bounds, random_model
from onnx import TensorProto, helper, numpy_helper

from boundprop.graph.ir import evaluate
from boundprop.graph.onnx_import import import_onnx

#: Largest relative difference allowed between the imported graph and onnxruntime (float32)
IMPORT_TOL = 1e-4


def _import_and_check(proto: onnx.ModelProto, reference_64, x: torch.Tensor, r: random.Random, what: str) -> str:
    """Import ``proto``; compare with onnxruntime (float32) and ``reference_64`` (float64, or None) at
    points around ``x[:1]``; then check the bounds of the imported graph (float64)."""
    try:
        graph = import_onnx(proto)
    except NotImplementedError as err:
        return "unsupported: " + " ".join(str(err).split())[:200]
    points = torch.cat([x, x[:1] + 0.5 * torch.randn(8, *x.shape[1:])])
    try:  # (its shape inference and its kernels disagree on a few shapes the chain was built from)
        session = ort.InferenceSession(proto.SerializeToString())
        name = session.get_inputs()[0].name
        expected = torch.cat([torch.from_numpy(session.run(None, {name: p[None].numpy()})[0]) for p in points])
    except Exception as err:  # noqa: BLE001 - no reference to compare with
        return "skipped: onnxruntime failed: " + " ".join(str(err).split())[:150]
    graph_64 = graph.to(dtype=torch.float64)
    with torch.no_grad():
        ours = evaluate(graph, (points,))[graph.output]
        worst = float(((ours - expected.reshape(ours.shape)).abs() / (1 + expected.abs().reshape(ours.shape))).max())
        if reference_64 is not None:
            exact = evaluate(graph_64, (points.double(),))[graph.output]
            torch_exact = reference_64(points.double())
            worst = max(worst, float(((exact - torch_exact).abs() / (1 + torch_exact.abs())).max()))
    if not worst <= IMPORT_TOL:
        return f"IMPORT differs from onnxruntime or torch by {worst:.3g} | {what}"
    torch.set_default_dtype(torch.float64)
    return check_bounds(r, lambda z: evaluate(graph_64, (z,))[graph_64.output], graph_64, x.double())


def onnx_case(seed: int) -> str:
    r = random.Random(seed)
    torch.manual_seed(seed)
    model, shape = random_model(r)  # float32 (see fuzz.run)
    x = torch.randn(r.choice([1, 1, 2]), *shape) * r.choice([0.3, 1.0])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x[:1],), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
        except Exception as err:  # noqa: BLE001 - the exporter's limits are not ours
            return "skipped: torch.onnx.export failed: " + " ".join(str(err).split())[:150]
    proto = onnx.load_from_string(buffer.getvalue())
    return _import_and_check(proto, model.double(), x, r, " ".join(str(model).split()))


# --- onnxops: random ONNX nodes ---------------------------------------------------------------------


class _Chain:
    """An ONNX graph under construction: one current value, its shape, nodes and initializers."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.shape_in = shape
        self.value, self.shape = "x", shape
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array, dtype=np.float32) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def model(self, nodes, output: str, opset: int = 18) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *self.shape_in[1:]])
        y = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
        graph = helper.make_graph(nodes, "fuzz", [x], [y], list(self.inits))
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = 8
        return proto

    def try_add(self, nodes: list, output: str, inits_before: int) -> bool:
        """Append ``nodes`` (ending in ``output``) if onnxruntime runs the result; learn the new shape."""
        proto = self.model(self.nodes + nodes, output)
        quiet = ort.SessionOptions()
        quiet.log_severity_level = 4  # the combinations onnxruntime rejects are dropped, not logged
        try:
            session = ort.InferenceSession(proto.SerializeToString(), quiet)
            out = session.run(None, {"x": np.random.rand(*self.shape_in).astype(np.float32)})[0]
        except Exception:  # noqa: BLE001 - an invalid combination: drop it
            del self.inits[inits_before:]
            return False
        if out.size == 0 or out.size > 600 or not np.isfinite(out).all():
            del self.inits[inits_before:]
            return False
        self.nodes += nodes
        self.value, self.shape = output, out.shape
        return True


def _pads(r: random.Random, dims: int, below: int = 2) -> list[int]:
    return [r.randint(0, below - 1) for _ in range(2 * dims)]


def _image_node(r: random.Random, c: _Chain) -> tuple[list, str]:
    """One node on the current ``(1, C, H, W)`` value: ``(nodes, output)``."""
    v, ch = c.value, c.shape[1]
    out = c.name("v")
    op = r.choice(["Conv", "Conv", "ConvTranspose", "MaxPool", "AveragePool", "BatchNormalization", "Pad",
                   "Resize", "Transpose", "Slice", "Reduce", "GlobalAveragePool", "GlobalMaxPool", "Concat",
                   "InstanceNormalization", "DepthToSpace", "SpaceToDepth", "Tile"])
    if op == "Conv":
        k, group = (r.randint(1, 3), r.randint(1, 3)), r.choice([1, 1, ch])
        cout = r.randint(1, 3) * group
        attrs = {"kernel_shape": list(k), "strides": [r.randint(1, 2), r.randint(1, 2)], "group": group,
                 "dilations": [r.choice([1, 1, 2]), 1]}
        if r.random() < 0.4:
            attrs["auto_pad"] = r.choice(["SAME_UPPER", "SAME_LOWER", "VALID"])
        else:
            attrs["pads"] = _pads(r, 2)
        weight = c.const(np.random.randn(cout, ch // group, *k) * 0.7)
        return [helper.make_node("Conv", [v, weight, c.const(np.random.randn(cout))], [out], **attrs)], out
    if op == "ConvTranspose":
        k, s = r.randint(1, 3), r.randint(1, 2)
        attrs = {"kernel_shape": [k, k], "strides": [s, s], "pads": [r.randint(0, k - 1)] * 4,
                 "output_padding": [r.randint(0, s - 1)] * 2}
        weight = c.const(np.random.randn(ch, r.randint(1, 2), k, k) * 0.7)
        return [helper.make_node("ConvTranspose", [v, weight], [out], **attrs)], out
    if op in ("MaxPool", "AveragePool"):
        k = [r.randint(1, 3), r.randint(1, 3)]
        attrs = {"kernel_shape": k, "ceil_mode": r.choice([0, 0, 1])}
        if r.random() < 0.7:
            attrs["strides"] = [r.randint(1, 2), r.randint(1, 2)]
        if r.random() < 0.3:
            attrs["auto_pad"] = r.choice(["SAME_UPPER", "SAME_LOWER"])
        else:
            attrs["pads"] = [r.randint(0, k[0] - 1), r.randint(0, k[1] - 1), r.randint(0, k[0] - 1),
                             r.randint(0, k[1] - 1)]
        if op == "AveragePool":
            attrs["count_include_pad"] = r.choice([0, 1])
        return [helper.make_node(op, [v], [out], **attrs)], out
    if op == "BatchNormalization":
        ins = [c.const(np.random.uniform(-2, 2, ch)), c.const(np.random.randn(ch)), c.const(np.random.randn(ch)),
               c.const(np.random.uniform(0.2, 2, ch))]
        return [helper.make_node(op, [v, *ins], [out], epsilon=1e-3)], out
    if op == "Pad":
        return [helper.make_node("Pad", [v, c.const([0, 0, *_pads(r, 1, 3)[:1], r.randint(0, 2), 0, 0,
                                                       r.randint(0, 2), r.randint(0, 2)], np.int64),
                                         c.const(r.uniform(-1, 1))], [out])], out
    if op == "Resize":
        mode = r.choice(["nearest", "linear"])
        scales = c.const([1, 1, r.choice([1.5, 2.0]), r.choice([1.0, 2.0])])
        return [helper.make_node("Resize", [v, "", scales], [out], mode=mode)], out
    if op == "Transpose":
        return [helper.make_node("Transpose", [v], [out], perm=[0, 1, 3, 2])], out
    if op == "Slice":
        axis, step = r.choice([1, 2, 3]), r.choice([1, 2, -1, -2])
        start, end = (r.randint(0, 1), 100) if step > 0 else (-1, -100)
        return [helper.make_node("Slice", [v, c.const([start], np.int64), c.const([end], np.int64),
                                           c.const([axis], np.int64), c.const([step], np.int64)], [out])], out
    if op == "Reduce":
        kind = r.choice(["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceSumSquare"])
        axes = c.const(r.choice([[1], [2, 3], [3]]), np.int64)
        return [helper.make_node(kind, [v, axes], [out], keepdims=1)], out
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return [helper.make_node(op, [v], [out])], out
    if op == "InstanceNormalization":
        ins = [c.const(np.random.uniform(-2, 2, ch)), c.const(np.random.randn(ch))]
        return [helper.make_node(op, [v, *ins], [out], epsilon=1e-3)], out
    if op == "DepthToSpace":
        return [helper.make_node(op, [v], [out], blocksize=2, mode=r.choice(["DCR", "CRD"]))], out
    if op == "SpaceToDepth":
        return [helper.make_node(op, [v], [out], blocksize=2)], out
    if op == "Tile":
        return [helper.make_node(op, [v, c.const([1, r.randint(1, 2), 1, r.randint(1, 2)], np.int64)], [out])], out
    other, relu = c.name("v"), c.name("v")
    return [helper.make_node("Relu", [v], [relu]),
            helper.make_node("Mul", [relu, c.const(np.random.randn(ch, 1, 1))], [other]),
            helper.make_node("Concat", [v, other], [out], axis=1)], out


ACTIVATIONS = [("Relu", {}), ("LeakyRelu", {"alpha": 0.2}), ("Elu", {"alpha": 0.5}), ("Selu", {}),
               ("Celu", {"alpha": 0.7}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}), ("HardSwish", {}),
               ("Softsign", {}), ("Softplus", {}), ("Sigmoid", {}), ("Tanh", {}), ("Abs", {}), ("Neg", {}),
               ("Sin", {}), ("Atan", {}), ("Erf", {}), ("Mish", {})]


def _any_node(r: random.Random, c: _Chain) -> tuple[list, str]:
    """One element-wise or arithmetic node, on any rank."""
    v, out = c.value, c.name("v")
    op = r.choice(["act", "act", "act", "Clip", "PRelu", "arith", "variadic", "Split", "Softmax"])
    if op == "act":
        kind, attrs = r.choice(ACTIVATIONS)
        return [helper.make_node(kind, [v], [out], **attrs)], out
    if op == "Clip":
        lo, hi = sorted([r.uniform(-1, 0.2), r.uniform(0.3, 1.5)])
        ins = [v, c.const(lo), c.const(hi)] if r.random() < 0.7 else [v, c.const(lo)]
        return [helper.make_node("Clip", ins, [out])], out
    if op == "PRelu":
        ch = c.shape[1]
        slope = np.random.uniform(-0.5, 1.8, (ch,) + (1,) * (len(c.shape) - 2))
        return [helper.make_node("PRelu", [v, c.const(slope)], [out])], out
    if op == "arith":
        kind = r.choice(["Add", "Sub", "Mul", "Div"])
        shape = r.choice([(1,), c.shape[1:], (c.shape[-1],)])
        value = np.random.uniform(0.5, 2, shape) * (1 if kind == "Div" else np.random.choice([-1, 1], shape))
        ins = [v, c.const(value)] if r.random() < 0.7 or kind == "Div" else [c.const(value), v]
        return [helper.make_node(kind, ins, [out])], out
    if op == "variadic":
        kind = r.choice(["Max", "Min", "Sum", "Mean"])
        relu, neg = c.name("v"), c.name("v")
        return [helper.make_node("Relu", [v], [relu]), helper.make_node("Neg", [v], [neg]),
                helper.make_node(kind, [v, relu, neg], [out])], out
    if op == "Split":
        axis = len(c.shape) - 1
        a, b = c.name("v"), c.name("v")
        return [helper.make_node("Split", [v], [a, b], axis=axis, num_outputs=2),
                helper.make_node("Concat", [b, a], [out], axis=axis)], out
    kind = r.choice(["Softmax", "LogSoftmax"])
    return [helper.make_node(kind, [v], [out], axis=-1)], out


def _sequence_node(r: random.Random, c: _Chain) -> tuple[list, str]:
    """An LSTM, GRU or RNN node on the current ``(1, T, F)`` value, with random settings, and the shape ops
    that bring one of its outputs back to ``(1, T', F')`` with the batch first."""
    v, (_, steps, features) = c.value, c.shape
    op = r.choice(["LSTM", "GRU", "RNN"])
    gates, hidden = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], r.randint(1, 2)
    direction = r.choice(["forward", "reverse", "bidirectional"])
    dirs = 2 if direction == "bidirectional" else 1
    layout = r.choice([0, 0, 1])
    attrs = {"hidden_size": hidden, "direction": direction, "layout": layout}
    if r.random() < 0.3:
        attrs["clip"] = r.uniform(0.5, 3.0)
    if op == "GRU":
        attrs["linear_before_reset"] = r.choice([0, 1])
    if op == "RNN" and r.random() < 0.5:
        attrs["activations"] = [r.choice(["Tanh", "Relu"])] * dirs
    nodes, source = [], v
    if not layout:
        source = c.name("v")
        nodes.append(helper.make_node("Transpose", [v], [source], perm=[1, 0, 2]))
    ins = [source, c.const(np.random.randn(dirs, gates * hidden, features) * 0.7),
           c.const(np.random.randn(dirs, gates * hidden, hidden) * 0.7)]
    optional = [c.const(np.random.randn(dirs, 2 * gates * hidden) * 0.5) if r.random() < 0.8 else "", ""]
    state_shape = (1, dirs, hidden) if layout else (dirs, 1, hidden)
    optional += [c.const(np.random.randn(*state_shape)) if r.random() < 0.3 else "" for _ in range(2 if op == "LSTM"
                                                                                                   else 1)]
    if op == "LSTM":
        optional.append(c.const(np.random.randn(dirs, 3 * hidden) * 0.5) if r.random() < 0.3 else "")
    ins += optional
    while ins[-1] == "":
        ins.pop()
    outs = [c.name("y"), c.name("h")] + ([c.name("c")] if op == "LSTM" else [])
    nodes.append(helper.make_node(op, ins, outs, **attrs))
    read = r.choice(outs)
    out = c.name("v")
    if read == outs[0]:  # Y: (T, dirs, B, H) or (B, T, dirs, H) -> (B, T, dirs H)
        moved = read
        if not layout:
            moved = c.name("v")
            nodes.append(helper.make_node("Transpose", [read], [moved], perm=[2, 0, 1, 3]))
        nodes.append(helper.make_node("Reshape", [moved, c.const([0, steps, dirs * hidden], np.int64)], [out]))
    elif layout:  # Y_h, Y_c: (B, dirs, H)
        nodes.append(helper.make_node("Identity", [read], [out]))
    else:  # (dirs, B, H) -> (B, dirs, H)
        nodes.append(helper.make_node("Transpose", [read], [out], perm=[1, 0, 2]))
    return nodes, out


def onnx_ops_case(seed: int) -> str:
    r = random.Random(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    kind = r.choices(["image", "vector", "sequence"], [0.5, 0.3, 0.2])[0]
    shape = {"image": (1, r.randint(1, 3), r.randint(3, 6), r.randint(3, 6)), "vector": (1, r.randint(2, 6)),
             "sequence": (1, r.randint(1, 3), r.randint(1, 3))}[kind]
    c = _Chain(shape)
    for _ in range(r.randint(2, 6)):
        for _attempt in range(5):
            before = len(c.inits)
            recurrent = any(n.op_type in ("LSTM", "GRU", "RNN") for n in c.nodes)
            if len(c.shape) == 3 and not recurrent and r.random() < 0.6:  # one: alpha-CROWN's cost grows fast
                nodes, out = _sequence_node(r, c)
            elif len(c.shape) == 4 and r.random() < 0.6:
                nodes, out = _image_node(r, c)
            else:
                nodes, out = _any_node(r, c)
            if c.try_add(nodes, out, before):
                break
    flat, y = c.name("v"), "y"
    n_out = r.randint(1, 3)
    width = int(np.prod(c.shape[1:]))
    gemm = helper.make_node("Gemm", [flat, c.const(np.random.randn(n_out, width) * 0.5),
                                     c.const(np.random.randn(n_out) if r.random() < 0.7 else r.uniform(-1, 1))],
                            [y], transB=1, alpha=r.choice([1.0, 0.5]), beta=r.choice([1.0, 2.0]))
    nodes = c.nodes + [helper.make_node("Flatten", [c.value], [flat], axis=1), gemm]
    proto = c.model(nodes, y)
    x = torch.randn(r.choice([1, 1, 2]), *shape[1:]) * r.choice([0.3, 1.0])
    return _import_and_check(proto, None, x, r, " ".join(n.op_type for n in nodes))
