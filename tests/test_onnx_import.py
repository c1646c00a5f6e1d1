"""ONNX importer: every translated op and the VNN-COMP models agree with onnxruntime."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import boundprop
from boundprop.graph import UnsupportedOperatorError, evaluate
from boundprop.graph.onnx_import import import_onnx

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
RNG = np.random.default_rng(0)


def _model(nodes, inputs, output, initializers=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, [output], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32 if np.asarray(array).dtype.kind == "f"
                                              else np.int64), name)


def _compare(model, shape, batches=(1, 3), low=-1.0, high=1.0):
    g = import_onnx(model)
    sess = ort.InferenceSession(model.SerializeToString())
    name = sess.get_inputs()[0].name
    for batch in batches:
        x = RNG.uniform(low, high, size=(batch, *shape[1:])).astype(np.float32)
        refs = [sess.run(None, {name: x[i:i + 1]})[0] for i in range(batch)]
        ref = np.concatenate(refs)
        out = evaluate(g, (torch.from_numpy(x),))[g.output].detach().numpy()
        np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    return g


def _io(shape, out_shape=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *shape[1:]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return x, y


UNARY = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Sign", "Exp", "Sin", "Cos", "Atan", "Identity", "Erf", "Floor",
         "Ceil", "Round"]


@pytest.mark.parametrize("op", UNARY)
def test_unary_ops(op):
    x, y = _io((1, 6))
    _compare(_model([helper.make_node(op, ["x"], ["y"])], [x], y), (1, 6))


ACTIVATION_CASES = [  # op, attributes, opset
    ("Elu", {"alpha": 0.4}, 13), ("Selu", {}, 13), ("Selu", {"alpha": 1.2, "gamma": 0.8}, 13),
    ("Celu", {"alpha": 0.6}, 13), ("HardSigmoid", {}, 13), ("HardSigmoid", {"alpha": 0.7, "beta": 0.2}, 13),
    ("HardSwish", {}, 14), ("Softsign", {}, 13), ("Mish", {}, 18), ("LogSoftmax", {"axis": -1}, 13),
]


@pytest.mark.parametrize("op,attrs,opset", ACTIVATION_CASES, ids=lambda c: str(c))
def test_activations_with_attributes(op, attrs, opset):
    """Each activation with its attributes agrees with onnxruntime (``Elu``'s ``alpha`` was once ignored),
    and its bounds hold at sampled points."""
    x, y = _io((1, 6))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node(op, ["h"], ["y"], **attrs)]
    g = _compare(_model(nodes, [x], y, [_init("W", RNG.normal(size=(6, 6)))], opset=opset), (1, 6), low=-3, high=3)
    _assert_bounds_hold(g, torch.rand(2, 6) * 4 - 2, 0.3)


def _assert_bounds_hold(g, x0: torch.Tensor, eps: float, methods=("IBP", "CROWN")) -> None:
    from soundness import box_points

    ptb = {g.inputs[0]: boundprop.PerturbationLpNorm(eps)}
    for method in methods:
        res = boundprop.compute_bounds(g, (x0,), ptb, method=method)
        for b in range(x0.shape[0]):
            out = evaluate(g, (box_points(x0[b] - eps, x0[b] + eps, 64),))[g.output].flatten(1)
            assert (out >= res.lower[b].flatten() - 1e-5).all() and (out <= res.upper[b].flatten() + 1e-5).all()


@pytest.mark.parametrize("slope", [[0.25], [0.1, -0.5, 1.5], [2.0]])
def test_prelu(slope):
    x, y = _io((1, 3, 4))
    nodes = [helper.make_node("PRelu", ["x", "s"], ["y"])]
    _compare(_model(nodes, [x], y, [_init("s", np.array(slope).reshape(-1, 1))]), (1, 3, 4))


def test_variadic_ops_reducemin_expand_gather_negative():
    x, y = _io((1, 2, 3))
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["x"], ["n"]),
             helper.make_node("Max", ["x", "r", "n"], ["mx"]), helper.make_node("Min", ["x", "r", "n", "c"], ["mn"]),
             helper.make_node("Sum", ["mx", "mn", "c"], ["sm"]), helper.make_node("Mean", ["sm", "x", "r"], ["me"]),
             helper.make_node("ReduceMin", ["me"], ["rm"], axes=[2], keepdims=1),
             helper.make_node("Expand", ["rm", "shape"], ["ex"]),
             helper.make_node("Gather", ["ex", "idx"], ["g"], axis=2),
             helper.make_node("Add", ["g", "me"], ["y"])]
    inits = [_init("c", RNG.normal(size=3)), _init("shape", np.array([1, 2, 3])), _init("idx", np.array([-1, 0, -2]))]
    g = _compare(_model(nodes, [x], y, inits), (1, 2, 3))
    _assert_bounds_hold(g, torch.randn(2, 2, 3), 0.2)  # ReduceMin/Max once emitted ops with no rules


@pytest.mark.parametrize("start,end,step", [(-1, -(2**63 - 1), -1), (4, 0, -2), (10, -10, -3), (-2, -6, -2)])
def test_slice_negative_steps(start, end, step):
    """Negative steps, on the input (a flip and a slice) and on a constant (the padding that torch's
    exporter reverses with a ``Slice``)."""
    x, y = _io((1, 2, 6))
    nodes = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s"]),
             helper.make_node("Slice", ["c", "st", "en", "ax", "sp"], ["cs"]),
             helper.make_node("ReduceSum", ["cs"], ["t"], keepdims=1),
             helper.make_node("Add", ["s", "t"], ["y"])]
    inits = [_init("st", np.array([start])), _init("en", np.array([end])), _init("ax", np.array([2])),
             _init("sp", np.array([step])), _init("c", RNG.normal(size=(1, 1, 6)))]
    _compare(_model(nodes, [x], y, inits), (1, 2, 6))


def test_casts():
    """``Cast`` to an integer type truncates (as onnxruntime); to float16 or bool it is unsupported."""
    x, y = _io((1, 5))
    nodes = [helper.make_node("Mul", ["x", "k"], ["h"]), helper.make_node("Cast", ["h"], ["i"], to=TensorProto.INT32),
             helper.make_node("Cast", ["i"], ["f"], to=TensorProto.FLOAT), helper.make_node("Add", ["f", "x"], ["y"])]
    g = _compare(_model(nodes, [x], y, [_init("k", np.array(3.0, dtype=np.float32))]), (1, 5), low=-2, high=2)
    assert torch.ops.aten.trunc.default in [n.target for n in g.nodes]
    for to in (TensorProto.FLOAT16, TensorProto.BOOL):
        nodes = [helper.make_node("Cast", ["x"], ["c"], to=to), helper.make_node("Cast", ["c"], ["y"], to=1)]
        with pytest.raises(UnsupportedOperatorError, match="lossy_cast"):
            import_onnx(_model(nodes, [x], y), boundprop.is_supported)


@pytest.mark.parametrize("case", ["InstanceNormalization", "GlobalMaxPool", "ReduceL1", "ReduceSumSquare", "Tile",
                                  "DepthToSpace-DCR", "DepthToSpace-CRD", "SpaceToDepth"])
def test_more_ops_match_onnxruntime_and_bound(case):
    x, y = _io((1, 4, 4, 6))
    op, _, mode = case.partition("-")
    inits = []
    if op == "InstanceNormalization":
        inits = [_init("s", RNG.uniform(0.5, 2, 4)), _init("b", RNG.normal(size=4))]
        node = helper.make_node(op, ["h", "s", "b"], ["y"], epsilon=1e-3)
    elif op in ("ReduceL1", "ReduceSumSquare"):
        inits = [_init("axes", np.array([1, 3]))]
        node = helper.make_node(op, ["h", "axes"], ["y"], keepdims=1)
    elif op == "Tile":
        inits = [_init("reps", np.array([1, 2, 1, 3]))]
        node = helper.make_node(op, ["h", "reps"], ["y"])
    elif op in ("DepthToSpace", "SpaceToDepth"):
        node = helper.make_node(op, ["h"], ["y"], blocksize=2, **({"mode": mode} if mode else {}))
    else:
        node = helper.make_node(op, ["h"], ["y"])
    nodes = [helper.make_node("Mul", ["x", "k"], ["h"]), node]
    inits.append(_init("k", RNG.normal(size=(1, 4, 1, 6))))
    g = _compare(_model(nodes, [x], y, inits, opset=18), (1, 4, 4, 6))
    _assert_bounds_hold(g, torch.randn(2, 4, 4, 6), 0.1)


def test_transpose_moving_the_batch_reported():
    """CROWN failed with an IndexError on such a graph; the importer names the op that needs the batch first and
    the node that moved it. Shape ops that bring the batch back are fine."""
    x, y = _io((1, 4))
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0], name="colvec"),
             helper.make_node("Relu", ["t"], ["y"])]
    with pytest.raises(UnsupportedOperatorError, match="Relu of a tensor whose batch dimension is not first.*colvec"):
        import_onnx(_model(nodes, [x], y))
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0], name="colvec"),
             helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0])]
    with pytest.raises(UnsupportedOperatorError, match="model output whose batch dimension is not first.*colvec"):
        import_onnx(_model(nodes[:1], [x], helper.make_tensor_value_info("t", TensorProto.FLOAT, None)))
    _compare(_model(nodes + [helper.make_node("Relu", ["y"], ["z"])], [x],
                    helper.make_tensor_value_info("z", TensorProto.FLOAT, None)), (1, 4))


def test_split_uneven_pad_axes_constant_of_shape():
    """Opset 18: ``Split`` into ``num_outputs`` uneven chunks, ``Pad`` with ``axes``; ``ConstantOfShape``."""
    x, y = _io((1, 2, 5))
    nodes = [helper.make_node("Split", ["x"], ["a", "b"], axis=2, num_outputs=2),
             helper.make_node("Pad", ["b", "pads", "", "axes"], ["bp"]),
             helper.make_node("ConstantOfShape", ["shape"], ["k"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
             helper.make_node("Mul", ["bp", "k"], ["bk"]),
             helper.make_node("Add", ["a", "bk"], ["y"])]
    inits = [_init("pads", np.array([0, 1])), _init("axes", np.array([2])), _init("shape", np.array([1, 2, 3]))]
    _compare(_model(nodes, [x], y, inits, opset=18), (1, 2, 5))


@pytest.mark.parametrize("kind", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("attrs", [{}, {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
                                   {"pads": [0, 1, 1, 0]}, {"pads": [1, 0, 2, 1], "count_include_pad": 1},
                                   {"pads": [0, 0, 1, 1], "strides": [2, 1]}, {"pads": [2, 1, 2, 1]},
                                   {"ceil_mode": 1, "strides": [2, 2]},
                                   {"ceil_mode": 1, "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
                                   {"ceil_mode": 1, "strides": [2, 4], "pads": [0, 1, 2, 0]},
                                   {"ceil_mode": 1, "strides": [3, 2], "pads": [2, 0, 1, 1], "count_include_pad": 1}])
def test_pool_padding_and_default_strides(kind, attrs):
    """Pool strides default to 1 (not the kernel); ``auto_pad``; asymmetric pads, pads over half the
    kernel and ``ceil_mode`` with them, where an average pool divides each window's sum by what it
    counts."""
    if kind == "MaxPool" and "count_include_pad" in attrs:
        pytest.skip("average pools only")
    x, y = _io((1, 2, 5, 6))
    nodes = [helper.make_node(kind, ["x"], ["y"], kernel_shape=[3, 2], **attrs)]
    g = _compare(_model(nodes, [x], y), (1, 2, 5, 6))
    _assert_bounds_hold(g, torch.randn(2, 2, 5, 6), 0.2)  # a max pool's asymmetric pads were -inf: NaN in CROWN


def test_gemm_matmul_add_sub_mul_div():
    x, y = _io((1, 4))
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("MatMul", ["h", "M"], ["m"]),
        helper.make_node("Add", ["m", "c"], ["a"]),
        helper.make_node("Sub", ["a", "c"], ["s"]),
        helper.make_node("Mul", ["s", "c"], ["p"]),
        helper.make_node("Div", ["p", "d"], ["y"]),
    ]
    inits = [_init("W", RNG.normal(size=(3, 4))), _init("b", RNG.normal(size=3)), _init("M", RNG.normal(size=(3, 5))),
             _init("c", RNG.normal(size=5)), _init("d", RNG.uniform(1, 2, size=5))]
    _compare(_model(nodes, [x], y, inits), (1, 4))


@pytest.mark.parametrize("auto_pad,pads,group", [("NOTSET", [1, 1, 1, 1], 1), ("NOTSET", [0, 1, 1, 0], 1),
                                                 ("SAME_UPPER", None, 1), ("NOTSET", [1, 1, 1, 1], 2)])
def test_conv_bn_pools(auto_pad, pads, group):
    x, y = _io((1, 4, 7, 7))
    kw = {"pads": pads} if pads else {}
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], strides=[2, 2], auto_pad=auto_pad, group=group, **kw),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("GlobalAveragePool", ["ap"], ["y"]),
    ]
    inits = [_init("W", RNG.normal(size=(6, 4 // group, 3, 3))), _init("B", RNG.normal(size=6)),
             _init("s", RNG.uniform(0.5, 2, 6)), _init("bb", RNG.normal(size=6)), _init("m", RNG.normal(size=6)),
             _init("v", RNG.uniform(0.5, 2, 6))]
    _compare(_model(nodes, [x], y, inits), (1, 4, 7, 7))


def test_shape_ops_and_constant_folding():
    x, y = _io((1, 2, 3, 4))
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["t", "target"], ["flat"]),
        helper.make_node("Slice", ["flat", "st", "en", "axs"], ["sl"]),
        helper.make_node("Split", ["sl", "sp"], ["p1", "p2"], axis=1),
        helper.make_node("Concat", ["p2", "p1"], ["cat"], axis=1),
        helper.make_node("Unsqueeze", ["cat", "ax1"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax1"], ["sq"]),
        helper.make_node("Pad", ["sq", "pads"], ["pd"]),
        helper.make_node("ReduceSum", ["pd", "ax1"], ["rs"], keepdims=1),
        helper.make_node("Gather", ["pd", "idx"], ["gt"], axis=1),
        helper.make_node("Add", ["rs", "gt"], ["y"]),
    ]
    inits = [_init("zero", np.array(0)), _init("ax0", np.array([0])), _init("minus1", np.array([-1])),
             _init("st", np.array([2])), _init("en", np.array([22])), _init("axs", np.array([1])),
             _init("sp", np.array([8, 12])), _init("ax1", np.array([1])), _init("pads", np.array([0, 1, 0, 2])),
             _init("idx", np.array([0, 3, 5]))]
    _compare(_model(nodes, [x], y, inits), (1, 2, 3, 4))


def test_softmax_flatten_reducemean_clip():
    x, y = _io((1, 3, 4))
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1),
             helper.make_node("Clip", ["s", "lo", "hi"], ["c"]),
             helper.make_node("ReduceMean", ["c"], ["m"], axes=[2], keepdims=0),
             helper.make_node("Flatten", ["m"], ["y"], axis=1)]
    inits = [_init("lo", np.array(0.1, dtype=np.float32)), _init("hi", np.array(0.5, dtype=np.float32))]
    model = _model(nodes, [x], y, inits)
    try:
        _compare(model, (1, 3, 4))
    except UnsupportedOperatorError as err:  # softmax/clip rules may not be present in this build
        pytest.skip(str(err))


RESIZE_CASES = [  # mode, coordinate_transformation_mode, nearest_mode, scales (H, W) or sizes, exclude_outside
    ("nearest", "asymmetric", "floor", (2.0, 2.0), None, 0),
    ("nearest", "half_pixel", "round_prefer_floor", (1.5, 2.5), None, 0),
    ("nearest", "half_pixel", "round_prefer_ceil", None, (7, 9), 0),
    ("nearest", "align_corners", "ceil", None, (3, 8), 0),
    ("nearest", "tf_half_pixel_for_nn", "round_prefer_floor", (0.6, 1.7), None, 0),
    ("nearest", "pytorch_half_pixel", "floor", (0.5, 1.0), None, 0),
    ("linear", "half_pixel", "round_prefer_floor", (2.0, 1.5), None, 0),
    ("linear", "align_corners", "round_prefer_floor", None, (8, 3), 0),
    ("linear", "asymmetric", "round_prefer_floor", (1.7, 0.6), None, 0),
    ("linear", "pytorch_half_pixel", "round_prefer_floor", None, (1, 7), 0),
    ("linear", "half_pixel_symmetric", "round_prefer_floor", (1.5, 2.0), None, 0),
    ("cubic", "half_pixel", "round_prefer_floor", (2.0, 1.3), None, 0),
    ("cubic", "align_corners", "round_prefer_floor", None, (6, 4), 0),
    ("cubic", "half_pixel", "round_prefer_floor", (0.7, 1.6), None, 1),
]


@pytest.mark.parametrize("case", RESIZE_CASES, ids=lambda c: "-".join(str(v) for v in c if v is not None))
def test_resize_matches_onnxruntime(case):
    mode, transform, nearest, scales, sizes, exclude_outside = case
    opset = 19 if transform == "half_pixel_symmetric" else 13
    x, y = _io((1, 2, 4, 5))
    inits = [_init("roi", np.zeros(0, dtype=np.float32))]
    if scales:
        inits += [_init("scales", np.array([1, 1, *scales], dtype=np.float32))]
        inputs = ["x", "roi", "scales"]
    else:
        inits += [_init("sizes", np.array([1, 2, *sizes], dtype=np.int64))]
        inputs = ["x", "roi", "", "sizes"]
    node = helper.make_node("Resize", inputs, ["r"], mode=mode, coordinate_transformation_mode=transform,
                            nearest_mode=nearest, exclude_outside=exclude_outside)
    nodes = [node, helper.make_node("Relu", ["r"], ["y"])]  # the resize's output is a perturbed node
    _compare(_model(nodes, [x], y, inits, opset=opset), (1, 2, 4, 5))


def test_upsample_opset9_and_resize_bounds_sound():
    """``Upsample`` (opset 9, nearest) and a Resize followed by a convolution: the imported graphs agree
    with onnxruntime, and their bounds hold at sampled points."""
    from soundness import box_points

    x, y = _io((1, 1, 3, 3))
    nodes = [helper.make_node("Upsample", ["x", "scales"], ["u"], mode="nearest"),
             helper.make_node("Conv", ["u", "w"], ["y"])]
    inits = [_init("scales", np.array([1, 1, 2, 3], dtype=np.float32)), _init("w", RNG.normal(size=(2, 1, 2, 2)))]
    g = _compare(_model(nodes, [x], y, inits, opset=9), (1, 1, 3, 3))
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["u"], mode="linear"),
             helper.make_node("Conv", ["u", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    inits = [_init("scales", np.array([1, 1, 1.5, 2], dtype=np.float32)), _init("w", RNG.normal(size=(2, 1, 2, 2)))]
    for graph in (g, _compare(_model(nodes, [x], y, inits), (1, 1, 3, 3))):
        x0 = torch.rand(2, 1, 3, 3)
        ptb = {graph.inputs[0]: boundprop.PerturbationLpNorm(0.1)}
        for method in ("IBP", "CROWN", "forward"):
            res = boundprop.compute_bounds(graph, (x0,), ptb, method=method)
            for b in range(2):
                pts = box_points(x0[b] - 0.1, x0[b] + 0.1, 64)
                out = evaluate(graph, (pts,))[graph.output].flatten(1)
                assert (out >= res.lower[b].flatten() - 1e-5).all() and (out <= res.upper[b].flatten() + 1e-5).all()


def test_resize_unsupported_settings_named():
    x, y = _io((1, 1, 4, 4))
    inits = [_init("roi", np.array([0, 0, 0.1, 0.1, 1, 1, 0.9, 0.9], dtype=np.float32)),
             _init("scales", np.array([1, 1, 2, 2], dtype=np.float32))]
    nodes = [helper.make_node("Resize", ["x", "roi", "scales"], ["y"], name="crop", mode="linear",
                              coordinate_transformation_mode="tf_crop_and_resize")]
    with pytest.raises(UnsupportedOperatorError, match="crop.*tf_crop_and_resize|tf_crop_and_resize.*crop"):
        import_onnx(_model(nodes, [x], y, inits))


def test_unsupported_ops_listed_together():
    x, y = _io((1, 4))
    nodes = [helper.make_node("Hardmax", ["x"], ["e"], name="my_hardmax"),
             helper.make_node("Floor", ["e"], ["f"], name="my_floor"),
             helper.make_node("Mod", ["x", "x"], ["r"], name="my_mod"),
             helper.make_node("Add", ["f", "r"], ["y"])]
    with pytest.raises(UnsupportedOperatorError) as info:
        import_onnx(_model(nodes, [x], y))
    text = str(info.value)
    assert "my_hardmax" in text and "my_mod" in text and "Hardmax" in text and "Mod" in text


def _bench_models():
    if not BENCH.exists():
        return []
    return [sorted((BENCH / d / "onnx").glob("*.onnx"))[0] for d in
            ("acasxu", "mnist_fc", "oval21", "collins_rul_cnn_2022", "rl_benchmarks")] + \
        sorted((BENCH / "rl_benchmarks" / "onnx").glob("*.onnx"))


@pytest.mark.parametrize("path", _bench_models(), ids=lambda p: p.name)
def test_vnncomp_models_match_onnxruntime(path):
    model = onnx.load(str(path))
    inp = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}][0]
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    g = _compare(model, shape, batches=(1, 2), low=0.0, high=1.0)
    x = torch.rand(2, *shape[1:])
    res = boundprop.compute_bounds(g, (x,), {g.inputs[0]: boundprop.PerturbationLpNorm(0.001)}, method="CROWN")
    out = evaluate(g, (x,))[g.output]
    assert (res.lower <= out + 1e-5).all() and (out <= res.upper + 1e-5).all()
