"""Import an ONNX model into the boundprop IR, directly from the ``onnx`` protobuf.

Every ONNX node becomes the ATen op(s) the torch front end would produce, so the rules and
algorithms never know where a graph came from. Subgraphs that depend only on constants (``Shape``
-> ``Gather`` -> ``Concat`` chains, ``Constant`` nodes, casts of initializers) are folded at
import time. The first dimension of every graph input is the batch dimension: reshapes whose target
shape starts with the example batch size (or 0/-1) keep the runtime batch size symbolic, so an
imported model runs with any batch (branch and bound bounds many boxes at once).

Ops without a translation are collected over the whole model and reported in one
:class:`~boundprop.graph.capture.UnsupportedOperatorError` naming each node.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import onnx_recurrent, onnx_resize, ops
from .capture import UnsupportedOperatorError, _prune
from .ir import Graph, Node, ParamSource, Ref, map_refs

aten = torch.ops.aten

_ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
                9: torch.bool, 10: torch.float16, 11: torch.float64}


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Builder:
    """Accumulates IR nodes while tracking an example value for every graph value."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.params: dict[str, ParamSource] = {}
        self.values: dict[str, Ref | torch.Tensor] = {}
        self.examples: dict[str, torch.Tensor] = {}
        self.inputs: list[str] = []
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        clean = "".join(c if c.isalnum() else "_" for c in base).strip("_") or "v"
        return f"{clean}_{self._count}"

    def constant_ref(self, value: torch.Tensor, hint: str = "const") -> Ref:
        name = self.fresh(hint)
        self.params[name] = ParamSource(name, "constant", value)
        self.examples[name] = value
        return Ref(name)

    def arg(self, value: Ref | torch.Tensor) -> Ref | torch.Tensor:
        """A value as a node argument: constants become constant leaves."""
        return self.constant_ref(value) if torch.is_tensor(value) else value

    def emit(self, target: Callable, args: tuple, kwargs: dict | None = None, hint: str = "", source: str = "") -> Ref:
        kwargs = kwargs or {}
        name = self.fresh(hint or getattr(target, "__name__", str(target)).split(".")[-1])
        resolve = lambda r: self.examples[r.name]
        self.examples[name] = target(*map_refs(args, resolve), **map_refs(kwargs, resolve))
        self.nodes.append(Node(name, target, args, kwargs, source))
        return Ref(name)

    def example(self, value: Ref | torch.Tensor) -> torch.Tensor:
        return self.examples[value.name] if isinstance(value, Ref) else value

    def batch_ref(self, value: Ref) -> Ref:
        return self.emit(aten.sym_size.int, (value, 0), hint="batch")


def _ints(values) -> list[int]:
    return [int(v) for v in (values.tolist() if torch.is_tensor(values) else values)]


def _is_const(*values) -> bool:
    return all(v is None or torch.is_tensor(v) for v in values)


# --- translations: (builder, inputs, attrs, source) -> output value(s) -------------------------


def _elementwise(target):
    def tr(b: _Builder, ins, attrs, src):
        if _is_const(*ins):
            return target(*ins)
        return b.emit(target, tuple(b.arg(v) for v in ins), hint=str(target), source=src)

    return tr


def _unary(target):
    def tr(b: _Builder, ins, attrs, src):
        (x,) = ins[:1]
        if _is_const(x):
            return target(x)
        return b.emit(target, (x,), hint=str(target), source=src)

    return tr


def _gemm(b: _Builder, ins, attrs, src):
    a, w, c = (list(ins) + [None])[:3]
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if attrs.get("transA", 0):
        a = _transpose2(b, a)
    if torch.is_tensor(w):
        weight = w if attrs.get("transB", 0) else w.t()
        weight = (weight * alpha).contiguous()
        bias = None if c is None else (torch.as_tensor(c) * beta).reshape(-1) if _bias_is_vector(c, weight) else None
        if c is not None and bias is None:
            out = b.emit(aten.linear.default, (a, b.arg(weight)), source=src, hint="gemm")
            return b.emit(aten.add.Tensor, (out, b.arg(torch.as_tensor(c) * beta)), source=src, hint="gemm_bias")
        args = (a, b.arg(weight)) + ((b.arg(bias),) if bias is not None else ())
        return b.emit(aten.linear.default, args, source=src, hint="gemm")
    w = w if not attrs.get("transB", 0) else _transpose2(b, w)
    out = b.emit(aten.matmul.default, (b.arg(a), b.arg(w)), source=src, hint="gemm")
    if alpha != 1.0:
        out = b.emit(aten.mul.Tensor, (out, alpha), source=src)
    if c is not None:
        out = b.emit(aten.add.Tensor, (out, b.arg(c * beta if torch.is_tensor(c) else c)), source=src)
    return out


def _bias_is_vector(c, weight) -> bool:
    c = torch.as_tensor(c)
    return c.numel() == weight.shape[0] and (c.dim() == 1 or (c.dim() == 2 and c.shape[0] == 1))


def _transpose2(b: _Builder, x):
    if torch.is_tensor(x):
        return x.t()
    return b.emit(aten.permute.default, (x, [1, 0]))


def _matmul(b: _Builder, ins, attrs, src):
    x, w = ins
    if _is_const(x, w):
        return torch.matmul(x, w)
    if torch.is_tensor(w) and w.dim() == 2 and not torch.is_tensor(x):
        return b.emit(aten.linear.default, (x, b.arg(w.t().contiguous())), source=src, hint="matmul")
    return b.emit(aten.matmul.default, (b.arg(x), b.arg(w)), source=src, hint="matmul")


def _conv_pads(attrs, x_shape, w_shape, dims):
    pads = list(attrs.get("pads", [0] * (2 * dims)))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    strides = list(attrs.get("strides", [1] * dims))
    dil = list(attrs.get("dilations", [1] * dims))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * dims)
        for i in range(dims):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (w_shape[2 + i] - 1) * dil[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + dims] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * dims)
    return pads, strides, dil


def _pad_first(b: _Builder, x, pads, dims, src, value=0.0, always: bool = False):
    """Asymmetric pads (any pads if ``always``) -> explicit constant_pad_nd; returns (x, symmetric pads)."""
    if pads[:dims] == pads[dims:] and not always:
        return x, pads[:dims]
    return b.emit(aten.constant_pad_nd.default, (x, _torch_pads(pads), value), source=src, hint="pad"), [0] * dims


def _torch_pads(pads: list[int]) -> list[int]:
    """ONNX pads ``[b_1, ..., b_n, e_1, ..., e_n]`` as torch's ``[b_n, e_n, ..., b_1, e_1]``."""
    dims = len(pads) // 2
    return [p for i in reversed(range(dims)) for p in (pads[i], pads[i + dims])]


def _conv(b: _Builder, ins, attrs, src):
    x, w, bias = (list(ins) + [None])[:3]
    dims = w.dim() - 2
    pads, strides, dil = _conv_pads(attrs, b.example(x).shape, w.shape, dims)
    x, pads = _pad_first(b, x, pads, dims, src)
    target = {1: aten.conv1d.default, 2: aten.conv2d.default}.get(dims)
    if target is None:
        raise UnsupportedOperatorError([(f"Conv{dims}d", src)])
    args = (x, b.arg(w), b.arg(bias) if bias is not None else None, strides, pads, dil, int(attrs.get("group", 1)))
    return b.emit(target, args, source=src, hint="conv")


def _conv_transpose(b: _Builder, ins, attrs, src):
    x, w, bias = (list(ins) + [None])[:3]
    dims = w.dim() - 2
    pads = list(attrs.get("pads", [0] * (2 * dims)))
    if _text(attrs, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or dims not in (1, 2):
        raise UnsupportedOperatorError([(f"ConvTranspose{dims}d (auto_pad {_text(attrs, 'auto_pad', 'NOTSET')})",
                                         src)])
    if _text(attrs, "auto_pad", "NOTSET") == "VALID":
        pads = [0] * (2 * dims)
    if pads[:dims] != pads[dims:] or attrs.get("output_shape") is not None:
        raise UnsupportedOperatorError([("ConvTranspose (asymmetric pads / output_shape)", src)])
    strides = list(attrs.get("strides", [1] * dims))
    dil = list(attrs.get("dilations", [1] * dims))
    out_pad = list(attrs.get("output_padding", [0] * dims))
    target = {1: aten.conv_transpose1d.default, 2: aten.conv_transpose2d.input}[dims]
    args = (x, b.arg(w), b.arg(bias) if bias is not None else None, strides, pads[:dims], out_pad,
            int(attrs.get("group", 1)), dil)
    return b.emit(target, args, source=src, hint="convT")


def _flatten(b: _Builder, ins, attrs, src):
    (x,) = ins
    axis = int(attrs.get("axis", 1))
    if torch.is_tensor(x):
        lead = int(np.prod(x.shape[:axis])) if axis > 0 else 1
        return x.reshape(lead, -1)
    shape = b.example(x).shape
    if axis == 0:
        return b.emit(aten.reshape.default, (x, [1, -1]), source=src, hint="flatten")
    rest = int(np.prod(shape[1:axis])) if axis > 1 else 1
    batch = b.batch_ref(x)
    lead = batch if rest == 1 else b.emit(operator.mul, (batch, rest))
    return b.emit(aten.reshape.default, (x, [lead, -1]), source=src, hint="flatten")


def _reshape(b: _Builder, ins, attrs, src):
    x, shape = ins
    target = _ints(shape)
    if torch.is_tensor(x):
        example = x
    else:
        example = b.example(x)
    if not attrs.get("allowzero", 0):
        target = [example.shape[i] if v == 0 else v for i, v in enumerate(target)]
    if torch.is_tensor(x):
        return x.reshape(target)
    if target and target[0] in (example.shape[0], -1):
        return b.emit(aten.reshape.default, (x, [b.batch_ref(x)] + target[1:]), source=src, hint="reshape")
    return b.emit(aten.reshape.default, (x, target), source=src, hint="reshape")


def _transpose(b: _Builder, ins, attrs, src):
    (x,) = ins
    perm = list(attrs.get("perm", list(reversed(range(b.example(x).dim())))))
    if torch.is_tensor(x):
        return x.permute(perm)
    if perm[0] != 0:  # bounds are per example, the batch first: held as lists until it comes back
        return onnx_recurrent.arrange(b, x, perm, src)
    return b.emit(aten.permute.default, (x, perm), source=src, hint="transpose")


def _concat(b: _Builder, ins, attrs, src):
    axis = int(attrs["axis"])
    if _is_const(*ins):
        return torch.cat([torch.as_tensor(v) for v in ins], axis)
    return b.emit(aten.cat.default, ([b.arg(v) for v in ins], axis), source=src, hint="concat")


def _slice_args(ins, attrs) -> tuple[list[int], list[int], list[int], list[int]]:
    """``(starts, ends, axes, steps)`` of a Slice (inputs from opset 10, attributes before)."""
    if len(ins) > 1:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        return starts, ends, axes, steps
    starts, ends = list(attrs["starts"]), list(attrs["ends"])
    return starts, ends, list(attrs.get("axes", range(len(starts)))), [1] * len(starts)


def _slice(b: _Builder, ins, attrs, src):
    x = ins[0]
    starts, ends, axes, steps = _slice_args(ins, attrs)
    rank = b.example(x).dim()
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis % rank
        if torch.is_tensor(out):  # numpy's slices clamp the ends as ONNX does, for either sign of step
            index = [slice(None)] * rank
            index[axis] = slice(start, end, step)
            out = torch.from_numpy(np.ascontiguousarray(out.numpy()[tuple(index)]))
        elif step < 0:  # the same elements, counted from the end of the flipped axis
            n = b.example(out).shape[axis]
            start = min(max(start + n if start < 0 else start, 0), n - 1)
            end = min(max(end + n if end < 0 else end, -1), n - 1)
            flipped = b.emit(aten.flip.default, (out, [axis]), source=src, hint="slice_flip")
            out = b.emit(aten.slice.Tensor, (flipped, axis, n - 1 - start, n - 1 - end, -step), source=src,
                         hint="slice")
        else:
            end = min(end, 2**62)
            out = b.emit(aten.slice.Tensor, (out, axis, start, end, step), source=src, hint="slice")
    return out


def _gather(b: _Builder, ins, attrs, src):
    x, index = ins
    axis = int(attrs.get("axis", 0))
    if not torch.is_tensor(index):
        raise UnsupportedOperatorError([("Gather with indices computed from the input", src)])
    if _is_const(x, index):
        return torch.index_select(x, axis, index.reshape(-1).long() % x.shape[axis]).reshape(
            x.shape[:axis % x.dim()] + index.shape + x.shape[axis % x.dim() + 1:])
    size = b.example(x).shape[axis]
    index = index.long() % size  # ONNX counts negative indices from the end
    if index.dim() == 0:
        return b.emit(aten.select.int, (x, axis, int(index)), source=src, hint="gather")
    if index.dim() == 1:
        return b.emit(aten.index_select.default, (x, axis, b.arg(index)), source=src, hint="gather")
    raise UnsupportedOperatorError([("Gather with multi-dimensional indices", src)])


def _split(b: _Builder, ins, attrs, src, n_out: int):
    x = ins[0]
    axis = int(attrs.get("axis", 0))
    size = b.example(x).shape[axis] if not torch.is_tensor(x) else x.shape[axis]
    split = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else list(attrs.get("split", []))
    if not split:  # equal chunks of ceil(size / n); the last is smaller when size does not divide
        chunk = -(-size // n_out)
        split = [min(chunk, size - i * chunk) for i in range(n_out)]
    outs, start = [], 0
    for length in split:
        outs.append(_slice(b, [x, [start], [start + length], [axis]], {}, src))
        start += length
    return outs


def _axes(ins, attrs):
    if len(ins) > 1 and ins[1] is not None:
        return _ints(ins[1])
    return list(attrs.get("axes", []))


def _squeeze(b: _Builder, ins, attrs, src):
    x = ins[0]
    axes = _axes(ins, attrs)
    if torch.is_tensor(x):
        return x.squeeze(tuple(axes)) if axes else x.squeeze()
    rank = b.example(x).dim()
    axes = [a % rank for a in axes] or [i for i, s in enumerate(b.example(x).shape) if s == 1 and i > 0]
    return b.emit(aten.squeeze.dims, (x, axes), source=src, hint="squeeze")


def _unsqueeze(b: _Builder, ins, attrs, src):
    x = ins[0]
    axes = _axes(ins, attrs)
    rank = (x.dim() if torch.is_tensor(x) else b.example(x).dim()) + len(axes)
    out = x
    for axis in sorted(a % rank for a in axes):
        out = out.unsqueeze(axis) if torch.is_tensor(out) else b.emit(aten.unsqueeze.default, (out, axis), source=src)
    return out


def _batch_norm(b: _Builder, ins, attrs, src):
    x, scale, bias, mean, var = ins[:5]
    eps = float(attrs.get("epsilon", 1e-5))
    return b.emit(ops.batch_norm_eval, (x, b.arg(scale), b.arg(bias), b.arg(mean), b.arg(var), 0.0, eps),
                  source=src, hint="batchnorm")


def _pool(kind):
    """``MaxPool`` / ``AveragePool``. Pads torch's pooling takes (symmetric, at most half the kernel,
    floor mode) go to it; others are applied first, explicitly: asymmetric or wide pads, and ``ceil_mode``,
    whose last, partial windows become whole ones over extra padding at the end (after a last window
    that would start in the trailing pad is dropped, as the ONNX specification, torch and onnxruntime's
    shape inference have it; onnxruntime's kernels keep it). A max
    pool pads with the lowest finite value; an average pool pads with zeros and divides each window's
    sum by what it should count: its elements of ``x`` (``count_include_pad=0``), or those of ``x`` and
    its pads, not the extra ones (``count_include_pad=1``)."""
    def tr(b: _Builder, ins, attrs, src):
        (x,) = ins
        kernel = list(attrs["kernel_shape"])
        dims = len(kernel)
        if dims != 2:
            raise UnsupportedOperatorError([(f"{kind}Pool{dims}d", src)])
        dil = list(attrs.get("dilations", [1] * dims))
        if kind == "Average" and dil != [1] * dims:
            raise UnsupportedOperatorError([("AveragePool with dilations", src)])
        size = list(b.example(x).shape[2:])
        pads, strides, _ = _conv_pads(attrs, [0, 0, *size], [0, 0, *kernel], dims)  # strides default to 1
        ceil = bool(attrs.get("ceil_mode", 0))
        include = bool(attrs.get("count_include_pad", 0))
        reach = [(kernel[i] - 1) * dil[i] + 1 for i in range(dims)]
        if any(size[i] + pads[i] + pads[i + dims] < reach[i] for i in range(dims)):
            raise UnsupportedOperatorError([(f"{kind}Pool with a window larger than its padded input", src)])
        extra = [0] * dims
        if ceil:
            for i in range(dims):
                padded = size[i] + pads[i] + pads[i + dims]
                n = -(-(padded - reach[i]) // strides[i]) + 1
                if (n - 1) * strides[i] >= size[i] + pads[i]:
                    n -= 1
                extra[i] = max(0, (n - 1) * strides[i] + reach[i] - padded)
        if pads[:dims] == pads[dims:] and all(pads[i] <= reach[i] // 2 for i in range(dims)) and not any(extra):
            if kind == "Max":
                return b.emit(aten.max_pool2d.default, (x, kernel, strides, pads[:dims], dil, False), source=src,
                              hint="maxpool")
            return b.emit(aten.avg_pool2d.default, (x, kernel, strides, pads[:dims], False, include), source=src,
                          hint="avgpool")
        full = pads[:dims] + [pads[dims + i] + extra[i] for i in range(dims)]
        if kind == "Max":
            # the lowest finite value, not -inf, which would make the linear bounds' constant 0 * -inf = NaN
            # where the pads get no weight (pads are smaller than the kernel, so a window holds an element
            # of x, unless a dilation steps over all of them)
            low = float(torch.finfo(b.example(x).dtype).min) if b.example(x).is_floating_point() else 0.0
            x, _ = _pad_first(b, x, full, dims, src, value=low, always=True)
            return b.emit(aten.max_pool2d.default, (x, kernel, strides, [0] * dims, dil, False), source=src,
                          hint="maxpool")
        x, _ = _pad_first(b, x, full, dims, src, always=True)
        out = b.emit(aten.avg_pool2d.default, (x, kernel, strides, [0] * dims, False, True), source=src,
                     hint="avgpool")
        if include:  # ones over x and its pads, zeros over the extra
            padded = [size[i] + pads[i] + pads[i + dims] for i in range(dims)]
            counted = torch.nn.functional.pad(torch.ones(1, 1, *padded), _torch_pads([0] * dims + extra))
        else:  # ones over x only
            counted = torch.nn.functional.pad(torch.ones(1, 1, *size), _torch_pads(full))
        share = torch.nn.functional.avg_pool2d(counted, kernel, strides)  # counted / kernel elements per window
        if bool((share == 1).all()):
            return out
        return b.emit(aten.mul.Tensor, (out, b.arg(1.0 / share)), source=src, hint="avgpool_count")

    return tr


def _global_avg(b: _Builder, ins, attrs, src):
    (x,) = ins
    dims = list(range(2, b.example(x).dim()))
    return b.emit(aten.mean.dim, (x, dims, True), source=src, hint="gap")


def _pad(b: _Builder, ins, attrs, src):
    x = ins[0]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise UnsupportedOperatorError([(f"Pad(mode={mode})", src)])
    if not _is_const(*ins[1:]):
        raise UnsupportedOperatorError([("Pad with pads or value computed from the input", src)])
    pads = _ints(ins[1]) if len(ins) > 1 else list(attrs["pads"])
    value = float(ins[2]) if len(ins) > 2 and ins[2] is not None else float(attrs.get("value", 0.0))
    if len(ins) > 3 and ins[3] is not None:  # opset 18: pads of the listed axes only
        rank = (x if torch.is_tensor(x) else b.example(x)).dim()
        axes = [a % rank for a in _ints(ins[3])]
        full = [0] * (2 * rank)
        for i, axis in enumerate(axes):
            full[axis], full[axis + rank] = pads[i], pads[i + len(axes)]
        pads = full
    torch_pad = _torch_pads(pads)
    while len(torch_pad) > 2 and torch_pad[-2:] == [0, 0]:
        torch_pad = torch_pad[:-2]
    if torch.is_tensor(x):
        return torch.nn.functional.pad(x, torch_pad, value=value)
    return b.emit(aten.constant_pad_nd.default, (x, torch_pad, value), source=src, hint="pad")


def _text(attrs: dict, key: str, default: str) -> str:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _resize_inputs(ins, attrs, shape):
    """``(scales, sizes)`` of a Resize, one entry per axis (None where not given)."""
    if len(ins) == 2:  # opset 10: (x, scales)
        scales_in, sizes_in = ins[1], None
    else:  # opset 11+: (x, roi, scales, sizes)
        scales_in = ins[2] if len(ins) > 2 else None
        sizes_in = ins[3] if len(ins) > 3 else None
    scales = [float(v) for v in scales_in.reshape(-1).tolist()] if scales_in is not None and scales_in.numel() else None
    sizes = _ints(sizes_in.reshape(-1)) if sizes_in is not None and sizes_in.numel() else None
    axes = attrs.get("axes")
    if axes:
        rank = len(shape)
        full_scales = [1.0] * rank if scales else None
        full_sizes = list(shape) if sizes else None
        for i, axis in enumerate(axes):
            if scales:
                full_scales[axis % rank] = scales[i]
            if sizes:
                full_sizes[axis % rank] = sizes[i]
        scales, sizes = full_scales, full_sizes
    return scales, sizes


def _resize(b: _Builder, ins, attrs, src, upsample: bool = False):
    """``Resize`` / ``Upsample``: per spatial axis an ``index_select`` (nearest) or a constant ``linear``
    (linear, cubic) along that axis (:mod:`.onnx_resize`)."""
    x = ins[0]
    example = b.example(x)
    shape = tuple(example.shape)
    rank = len(shape)
    if upsample:  # opset 7: scales attribute; opset 9: scales input; asymmetric coordinates
        scales = [float(v) for v in (ins[1].reshape(-1).tolist() if len(ins) > 1 else attrs["scales"])]
        sizes = None
        settings = {"mode": _text(attrs, "mode", "nearest"), "coordinate_transformation_mode": "asymmetric",
                    "nearest_mode": "simple"}
    else:
        if any(not _is_const(v) for v in ins[1:]):
            raise UnsupportedOperatorError([("Resize with computed scales or sizes", src)])
        scales, sizes = _resize_inputs(ins, attrs, shape)
        settings = {"mode": _text(attrs, "mode", "nearest"),
                    "coordinate_transformation_mode": _text(attrs, "coordinate_transformation_mode", "half_pixel"),
                    "nearest_mode": _text(attrs, "nearest_mode", "round_prefer_floor"),
                    "cubic_coeff_a": attrs.get("cubic_coeff_a", -0.75),
                    "exclude_outside": attrs.get("exclude_outside", 0), "antialias": attrs.get("antialias", 0)}
        if sizes and _text(attrs, "keep_aspect_ratio_policy", "stretch") != "stretch":
            raise UnsupportedOperatorError([("Resize with keep_aspect_ratio_policy", src)])
    lengths = onnx_resize.output_lengths(shape, scales, sizes)
    if list(lengths[:2]) != list(shape[:2]):
        raise UnsupportedOperatorError([("Resize of the batch or channel axis", src)])
    for axis in range(2, rank):
        scale = scales[axis] if scales else lengths[axis] / shape[axis]
        try:
            plan = onnx_resize.axis_plan(settings, shape[axis], lengths[axis], scale)
        except ValueError as err:
            raise UnsupportedOperatorError([(f"Resize ({err})", src)]) from None
        if plan is None:
            continue
        kind, table = plan
        if kind == "index":
            x = (torch.index_select(x, axis, table) if torch.is_tensor(x) else
                 b.emit(aten.index_select.default, (x, axis, b.arg(table)), source=src, hint="resize"))
            continue
        table = table.to(example.dtype)
        order = list(range(rank))
        order[axis], order[-1] = order[-1], order[axis]  # a swap: its own inverse
        if torch.is_tensor(x):
            x = torch.nn.functional.linear(x.permute(order), table).permute(order)
            continue
        if axis != rank - 1:
            x = b.emit(aten.permute.default, (x, order), source=src, hint="resize")
        x = b.emit(aten.linear.default, (x, b.arg(table)), source=src, hint="resize")
        if axis != rank - 1:
            x = b.emit(aten.permute.default, (x, order), source=src, hint="resize")
    return x


def _softmax(b: _Builder, ins, attrs, src, opset: int, target=aten.softmax.int):
    """``Softmax`` / ``LogSoftmax`` (``target``); before opset 13 the op flattened the axes from ``axis``
    on, which is the last axis alone only when ``axis`` is the last."""
    (x,) = ins
    axis = int(attrs.get("axis", -1 if opset >= 13 else 1))
    rank = b.example(x).dim()
    if opset < 13 and axis % rank != rank - 1:
        raise UnsupportedOperatorError([("Softmax (opset < 13) over several axes", src)])
    return b.emit(target, (x, axis), source=src, hint="softmax")


def _variadic(target, mean: bool = False):
    """``Max``, ``Min``, ``Sum``, ``Mean`` of any number of inputs, folded pairwise."""
    pairwise = _elementwise(target)

    def tr(b: _Builder, ins, attrs, src):
        out = ins[0]
        for value in ins[1:]:
            out = pairwise(b, [out, value], attrs, src)
        if mean and len(ins) > 1:
            out = out / len(ins) if torch.is_tensor(out) else b.emit(aten.mul.Tensor, (out, 1.0 / len(ins)), source=src)
        return out

    return tr


def _elu_family(kind: str):
    """``Elu(alpha)``, ``Selu(alpha, gamma)``, ``Celu(alpha)`` as ATen's ``elu(x, alpha, scale, input_scale)``
    = ``scale * (x if x > 0 else alpha * (exp(input_scale * x) - 1))``."""
    def tr(b: _Builder, ins, attrs, src):
        if kind == "Selu":
            params = (float(attrs.get("alpha", 1.67326319217681884765625)),
                      float(attrs.get("gamma", 1.05070102214813232421875)), 1.0)
        else:
            alpha = float(attrs.get("alpha", 1.0))
            params = (alpha, 1.0, 1.0 / alpha if kind == "Celu" else 1.0)
        if torch.is_tensor(ins[0]):
            return aten.elu.default(ins[0], *params)
        return b.emit(aten.elu.default, (ins[0], *params), source=src, hint=kind.lower())

    return tr


def _hard_sigmoid(b: _Builder, ins, attrs, src, swish: bool = False):
    """``HardSigmoid(alpha, beta) = clamp(alpha x + beta, 0, 1)``; ``HardSwish = x HardSigmoid(1/6, 1/2)``."""
    x = ins[0]
    alpha, beta = (1.0 / 6.0, 0.5) if swish else (float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5)))
    if torch.is_tensor(x):
        gate = (alpha * x + beta).clamp(0.0, 1.0)
        return x * gate if swish else gate
    scaled = b.emit(aten.add.Tensor, (b.emit(aten.mul.Tensor, (x, alpha), source=src), beta), source=src)
    gate = b.emit(aten.clamp.default, (scaled, 0.0, 1.0), source=src, hint="hardsigmoid")
    return b.emit(aten.mul.Tensor, (x, gate), source=src, hint="hardswish") if swish else gate


def _softsign(b: _Builder, ins, attrs, src):
    """``x / (1 + |x|)``."""
    x = ins[0]
    if torch.is_tensor(x):
        return x / (1 + x.abs())
    denominator = b.emit(aten.add.Tensor, (b.emit(aten.abs.default, (x,), source=src), 1.0), source=src)
    return b.emit(aten.div.Tensor, (x, denominator), source=src, hint="softsign")


def _mish(b: _Builder, ins, attrs, src):
    """``x tanh(softplus(x))``."""
    x = ins[0]
    if torch.is_tensor(x):
        return x * torch.tanh(torch.nn.functional.softplus(x))
    gate = b.emit(aten.tanh.default, (b.emit(aten.softplus.default, (x,), source=src),), source=src)
    return b.emit(aten.mul.Tensor, (x, gate), source=src, hint="mish")


def _prelu(b: _Builder, ins, attrs, src):
    """``PRelu(x, slope)``, ``slope`` broadcast to ``x`` from the right: ATen's ``_prelu_kernel`` when the
    slopes vary along one axis at most (its rule aligns them from the right, see ``rules/relu.py``),
    else ``relu(x) - slope relu(-x)``."""
    x, slope = ins
    if not torch.is_tensor(slope):
        raise UnsupportedOperatorError([("PRelu with a slope computed from the input", src)])
    if torch.is_tensor(x):
        return torch.where(x > 0, x, slope * x)
    if all(n == 1 for n in slope.shape[1:]):
        return b.emit(aten._prelu_kernel.default, (x, b.arg(slope)), source=src, hint="prelu")
    positive = b.emit(aten.relu.default, (x,), source=src, hint="prelu")
    negative = b.emit(aten.relu.default, (b.emit(aten.neg.default, (x,), source=src),), source=src)
    scaled = b.emit(aten.mul.Tensor, (negative, b.arg(slope)), source=src)
    return b.emit(aten.sub.Tensor, (positive, scaled), source=src, hint="prelu")


def _constant_of_shape(b: _Builder, ins, attrs, src):
    import onnx.numpy_helper as nh

    if not torch.is_tensor(ins[0]):
        raise UnsupportedOperatorError([("ConstantOfShape of a shape computed from the input", src)])
    value = torch.from_numpy(np.array(nh.to_array(attrs["value"]))) if "value" in attrs else torch.zeros(1)
    return value.reshape(()).expand(_ints(ins[0])).clone()


def _constant_only(fn: Callable, name: str):
    """Ops that only ever compute shapes and masks in exported models: folded when every input is a
    constant, unsupported otherwise."""
    def tr(b: _Builder, ins, attrs, src):
        if not _is_const(*ins):
            raise UnsupportedOperatorError([(f"{name} of values computed from the input", src)])
        return fn(*ins, **attrs)

    return tr


def _expand(b: _Builder, ins, attrs, src):
    x, shape = ins
    if torch.is_tensor(x):
        return x * torch.ones(_ints(shape), dtype=x.dtype)  # ONNX Expand broadcasts both ways
    example = b.example(x)
    target = torch.broadcast_shapes(example.shape, tuple(_ints(shape)))
    if target == example.shape:
        return x
    if len(target) == example.dim() and target[0] == example.shape[0]:
        sizes = [-1] + list(target[1:])
        return b.emit(aten.expand.default, (x, sizes), source=src, hint="expand")
    raise UnsupportedOperatorError([("Expand over the batch dimension", src)])


def _reduce(target):
    def tr(b: _Builder, ins, attrs, src):
        x = ins[0]
        axes = _axes(ins, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range((x if torch.is_tensor(x) else b.example(x)).dim()))
        if torch.is_tensor(x):
            return target(x, axes, keep)
        return b.emit(target, (x, axes, keep), source=src, hint="reduce")

    return tr


def _cast(b: _Builder, ins, attrs, src):
    (x,) = ins
    dtype = _ONNX_DTYPES.get(int(attrs["to"]), torch.float32)
    if torch.is_tensor(x):
        return x.to(dtype)
    source = b.example(x).dtype
    if source.is_floating_point:  # as capture does (see capture._rewrite_call)
        if ops.is_lossy_float_cast(source, dtype):
            return b.emit(ops.lossy_cast, (x, dtype), source=src, hint="cast")
        if dtype.is_floating_point:
            return x
        return b.emit(aten.trunc.default, (x,), source=src, hint="cast")
    return b.emit(aten._to_copy.default, (x,), {"dtype": dtype}, source=src, hint="cast")


def _clip(b: _Builder, ins, attrs, src):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 else attrs.get("min")
    hi = ins[2] if len(ins) > 2 else attrs.get("max")
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if torch.is_tensor(x):
        return x.clamp(lo, hi)
    return b.emit(aten.clamp.default, (x, lo, hi), source=src, hint="clip")


def _identity(b: _Builder, ins, attrs, src):
    return ins[0]


def _shape(b: _Builder, ins, attrs, src):
    shape = b.example(ins[0]).shape if not torch.is_tensor(ins[0]) else ins[0].shape
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return torch.tensor(list(shape)[start:end], dtype=torch.int64)


def _constant(b: _Builder, ins, attrs, src):
    import onnx.numpy_helper as nh

    if "value" in attrs:
        return torch.from_numpy(np.array(nh.to_array(attrs["value"])))
    for key in ("value_float", "value_int"):
        if key in attrs:
            return torch.tensor(attrs[key])
    for key in ("value_floats", "value_ints"):
        if key in attrs:
            return torch.tensor(list(attrs[key]))
    raise UnsupportedOperatorError([("Constant (unsupported value kind)", src)])


def _leaky(b: _Builder, ins, attrs, src):
    return b.emit(aten.leaky_relu.default, (ins[0], float(attrs.get("alpha", 0.01))), source=src)


def _pow(b: _Builder, ins, attrs, src):
    x, p = ins
    if _is_const(x, p):
        return torch.pow(x, p)
    if not torch.is_tensor(p) or p.numel() != 1:
        raise UnsupportedOperatorError([("Pow with a non-constant exponent", src)])
    return b.emit(aten.pow.Tensor_Scalar, (x, float(p)), source=src, hint="pow")


def _gelu(b: _Builder, ins, attrs, src):
    approx = attrs.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return b.emit(aten.gelu.default, (ins[0],), {"approximate": approx}, source=src)


def _layer_norm(b: _Builder, ins, attrs, src):
    x, scale, bias = (list(ins) + [None])[:3]
    axis = int(attrs.get("axis", -1))
    rank = b.example(x).dim()
    shape = list(b.example(x).shape[axis % rank:])
    return b.emit(aten.layer_norm.default, (x, shape, b.arg(scale), b.arg(bias) if bias is not None else None,
                                            float(attrs.get("epsilon", 1e-5))), source=src, hint="layernorm")


def _instance_norm(b: _Builder, ins, attrs, src):
    """``InstanceNormalization``: each (example, channel) map normalised over its spatial axes, then
    ``scale`` and ``B`` per channel: a layer norm over the spatial shape, without its own affine part."""
    x, scale, bias = ins
    shape = list(b.example(x).shape[2:])
    normal = b.emit(aten.layer_norm.default, (x, shape, None, None, float(attrs.get("epsilon", 1e-5))), source=src,
                    hint="instancenorm")
    per_channel = [-1] + [1] * len(shape)
    scaled = b.emit(aten.mul.Tensor, (normal, b.arg(scale.reshape(per_channel))), source=src)
    return b.emit(aten.add.Tensor, (scaled, b.arg(bias.reshape(per_channel))), source=src)


def _global_max(b: _Builder, ins, attrs, src):
    (x,) = ins
    return b.emit(aten.amax.default, (x, list(range(2, b.example(x).dim())), True), source=src, hint="globalmax")


def _reduce_of(target, *extra):
    """``ReduceL1`` (``sum |x|``) and ``ReduceSumSquare`` (``sum x^2``): ``target(x, *extra)``, then ``ReduceSum``."""
    reduce_sum = _reduce(aten.sum.dim_IntList)

    def tr(b: _Builder, ins, attrs, src):
        x = ins[0]
        mapped = target(x, *extra) if torch.is_tensor(x) else b.emit(target, (x, *extra), source=src)
        return reduce_sum(b, [mapped, *ins[1:]], attrs, src)

    return tr


def _tile(b: _Builder, ins, attrs, src):
    x, repeats = ins
    if not torch.is_tensor(repeats):
        raise UnsupportedOperatorError([("Tile with repeats computed from the input", src)])
    counts = _ints(repeats)
    if torch.is_tensor(x):
        return x.repeat(counts)
    if counts[0] != 1:
        raise UnsupportedOperatorError([("Tile over the batch dimension", src)])
    return b.emit(aten.repeat.default, (x, counts), source=src, hint="tile")


def _depth_space(to_space: bool):
    """``DepthToSpace`` (modes DCR and CRD) and ``SpaceToDepth`` as reshape, permute, reshape::

        DCR: (N, b, b, C/b^2, H, W) -> (N, C/b^2, H, b, W, b);  CRD: (N, C/b^2, b, b, H, W) -> same
        SpaceToDepth: (N, C, H/b, b, W/b, b) -> (N, b, b, C, H/b, W/b)
    """
    def tr(b: _Builder, ins, attrs, src):
        (x,) = ins
        k = int(attrs["blocksize"])
        _, c, h, w = (x if torch.is_tensor(x) else b.example(x)).shape
        if to_space:
            crd = _text(attrs, "mode", "DCR") == "CRD"
            split = [c // (k * k), k, k, h, w] if crd else [k, k, c // (k * k), h, w]
            perm = [0, 1, 4, 2, 5, 3] if crd else [0, 3, 4, 1, 5, 2]
            final = [c // (k * k), h * k, w * k]
        else:
            split, perm, final = [c, h // k, k, w // k, k], [0, 3, 5, 1, 2, 4], [c * k * k, h // k, w // k]
        if torch.is_tensor(x):
            return x.reshape(-1, *split).permute(perm).reshape(-1, *final)
        batch = b.batch_ref(x)
        out = b.emit(aten.reshape.default, (x, [batch, *split]), source=src)
        out = b.emit(aten.permute.default, (out, perm), source=src)
        return b.emit(aten.reshape.default, (out, [batch, *final]), source=src, hint="depth_space")

    return tr


TRANSLATIONS: dict[str, Callable] = {
    "Gemm": _gemm, "MatMul": _matmul, "Conv": _conv, "ConvTranspose": _conv_transpose,
    "Relu": _unary(aten.relu.default), "Sigmoid": _unary(aten.sigmoid.default), "Tanh": _unary(aten.tanh.default),
    "Exp": _unary(aten.exp.default), "Log": _unary(aten.log.default), "Sqrt": _unary(aten.sqrt.default),
    "Reciprocal": _unary(aten.reciprocal.default), "Neg": _unary(aten.neg.default), "Abs": _unary(aten.abs.default),
    "Sign": _unary(aten.sign.default), "Sin": _unary(aten.sin.default), "Cos": _unary(aten.cos.default),
    "Atan": _unary(aten.atan.default), "Softplus": _unary(aten.softplus.default), "Elu": _elu_family("Elu"),
    "Selu": _elu_family("Selu"), "Celu": _elu_family("Celu"), "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda b, ins, attrs, src: _hard_sigmoid(b, ins, attrs, src, swish=True), "Softsign": _softsign,
    "Mish": _mish, "PRelu": _prelu,
    "Erf": _unary(aten.erf.default), "Floor": _unary(aten.floor.default), "Ceil": _unary(aten.ceil.default),
    "Round": _unary(aten.round.default),
    "Add": _elementwise(aten.add.Tensor), "Sub": _elementwise(aten.sub.Tensor), "Mul": _elementwise(aten.mul.Tensor),
    "Div": _elementwise(aten.div.Tensor), "Max": _variadic(aten.maximum.default),
    "Min": _variadic(aten.minimum.default), "Sum": _variadic(aten.add.Tensor),
    "Mean": _variadic(aten.add.Tensor, mean=True),
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose, "Concat": _concat, "Slice": _slice,
    "Gather": _gather, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "BatchNormalization": _batch_norm,
    "MaxPool": _pool("Max"), "AveragePool": _pool("Average"), "GlobalAveragePool": _global_avg, "Pad": _pad,
    "ReduceSum": _reduce(aten.sum.dim_IntList), "ReduceMean": _reduce(aten.mean.dim),
    "ReduceMax": _reduce(aten.amax.default), "ReduceMin": _reduce(aten.amin.default),
    "ReduceL1": _reduce_of(aten.abs.default), "ReduceSumSquare": _reduce_of(aten.pow.Tensor_Scalar, 2.0),
    "GlobalMaxPool": _global_max,
    "InstanceNormalization": _instance_norm, "Tile": _tile, "DepthToSpace": _depth_space(True),
    "SpaceToDepth": _depth_space(False),
    "Less": _constant_only(lambda a, c: torch.lt(a, c), "Less"),
    "Greater": _constant_only(lambda a, c: torch.gt(a, c), "Greater"),
    "Not": _constant_only(lambda a: torch.logical_not(a), "Not"),
    "Cast": _cast, "Clip": _clip, "Identity": _identity, "Dropout": _identity, "Shape": _shape,
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Expand": _expand,
    "Equal": _constant_only(lambda a, c: torch.eq(a, c), "Equal"),
    "Where": _constant_only(lambda c, a, d: torch.where(c.bool(), a, d), "Where"),
    "Range": _constant_only(lambda a, c, d: torch.arange(a.item(), c.item(), d.item(), dtype=a.dtype), "Range"),
    "LeakyRelu": _leaky, "Pow": _pow, "Gelu": _gelu,
    "Resize": _resize, "Upsample": lambda b, ins, attrs, src: _resize(b, ins, attrs, src, upsample=True),
    "LayerNormalization": _layer_norm,
    "Split": _split, "Softmax": _softmax, "LogSoftmax": _softmax,  # these take extra arguments
    "LSTM": onnx_recurrent.recurrent("LSTM"), "GRU": onnx_recurrent.recurrent("GRU"),
    "RNN": onnx_recurrent.recurrent("RNN"),
}


#: translations that take values whose batch dimension is not first (:mod:`.onnx_recurrent`)
LEADING_TRANSLATIONS: dict[str, Callable] = onnx_recurrent.leading_translations(_axes, _slice_args, _slice)
#: recurrent layers: several outputs, their translations return a list
_RECURRENT = ("LSTM", "GRU", "RNN")


def import_onnx(path_or_model: str | Path | Any, is_supported: Callable[[Any], bool] | None = None) -> Graph:
    """Read an ONNX model (path or ``onnx.ModelProto``) into a :class:`Graph`.

    The returned graph takes one tensor per ONNX graph input (initializers excluded), batch first.
    Parameters become constant leaves (``graph.params``) named after their initializers.
    """
    import onnx
    import onnx.numpy_helper as nh

    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, (str, Path)) else path_or_model
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    g = model.graph
    b = _Builder()
    init_names = {t.name for t in g.initializer}
    for tensor in g.initializer:
        b.values[tensor.name] = torch.from_numpy(np.array(nh.to_array(tensor)).copy())
    shapes = []
    for inp in g.input:
        if inp.name in init_names:
            continue
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
        dtype = _ONNX_DTYPES.get(inp.type.tensor_type.elem_type, torch.float32)
        name = b.fresh(inp.name)
        b.inputs.append(name)
        b.examples[name] = torch.zeros(dims, dtype=dtype)
        b.values[inp.name] = Ref(name)
        shapes.append(tuple(dims))
    missing: list[tuple[str, str]] = []
    for node in g.node:
        src = f"ONNX node {node.name or '(unnamed)'} ({node.op_type})"
        moved = [b.values[name] for name in node.input if isinstance(b.values.get(name), onnx_recurrent.Leading)]
        translate = (LEADING_TRANSLATIONS if moved else TRANSLATIONS).get(node.op_type)
        if moved and translate is None:
            missing.append((f"{node.op_type} of a tensor whose batch dimension is not first (moved by "
                            f"{moved[0].origin})", src))
            for out in node.output:
                b.values[out] = Ref("__missing__")
            continue
        if node.domain not in ("", "ai.onnx") or translate is None:
            missing.append((node.op_type, src))
            for out in node.output:
                b.values[out] = Ref("__missing__")
            continue
        ins = [b.values[name] if name else None for name in node.input]
        if any(isinstance(v, Ref) and v.name == "__missing__" for v in ins):
            for out in node.output:
                b.values[out] = Ref("__missing__")
            continue
        attrs = _attrs(node)
        try:
            if node.op_type == "Split":
                outs = _split(b, ins, attrs, src, len(node.output))
            elif node.op_type in _RECURRENT:
                outs = translate(b, ins, attrs, src)
            elif node.op_type in ("Softmax", "LogSoftmax"):
                target = aten.softmax.int if node.op_type == "Softmax" else aten.log_softmax.int
                outs = [_softmax(b, ins, attrs, src, opset, target)]
            else:
                outs = [translate(b, ins, attrs, src)]
        except UnsupportedOperatorError as err:
            missing.extend(err.entries)
            outs = [Ref("__missing__")] * len(node.output)
        for name, value in zip(node.output, outs):
            b.values[name] = value
    if missing:
        raise UnsupportedOperatorError(missing)
    if len(g.output) != 1:
        raise TypeError(f"boundprop needs a model with one output; this ONNX model has {len(g.output)}")
    out = b.values[g.output[0].name]
    if isinstance(out, onnx_recurrent.Leading):
        raise UnsupportedOperatorError([(f"model output whose batch dimension is not first (moved by {out.origin})",
                                         "the ONNX graph's output")])
    if torch.is_tensor(out):
        raise TypeError("the ONNX model's output does not depend on its input")
    if out.name in b.inputs:
        out = b.emit(aten.alias.default, (out,), hint="output")
    graph = _prune(Graph(tuple(b.nodes), tuple(b.inputs), dict(b.params), out.name, None, tuple(shapes)))
    if is_supported is not None:
        from .capture import check_supported

        check_supported(graph, is_supported)
    return graph
