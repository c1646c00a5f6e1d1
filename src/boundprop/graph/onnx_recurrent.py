"""ONNX recurrent layers (``LSTM``, ``GRU``, ``RNN``) and the time-major tensors around them.

ONNX's recurrent ops are time-major by default (``layout = 0``, what PyTorch exports): the input
is ``X: (T, batch, in)``, the outputs ``Y: (T, directions, batch, hidden)`` and
``Y_h``, ``Y_c: (directions, batch, hidden)``, and exporters wrap them in Transposes that move the
batch axis. boundprop's IR keeps the batch first in every tensor (bounds are per example), so the
importer holds such a value as a :class:`Leading`: the axes before the batch as nested Python
lists, whose leaves are batch-first IR values. The shape ops an exporter puts around a recurrence
act on the lists and on the leaves (:data:`LEADING_TRANSLATIONS`: Transpose, Squeeze, Unsqueeze,
Gather, Slice, Concat, Reshape, Shape); a Transpose that brings the batch back to the front stacks the
leaves. Any other op on a :class:`Leading` value is reported as unsupported, naming the node that
moved the batch.

The layers are unrolled step by step with ops that have bound rules (``linear``, ``sigmoid``,
``tanh``, ``relu``, products and sums), as :mod:`.recurrent` does for ``nn.LSTM`` & co. at capture.
Per step, with ``x`` the step's input, ``h`` (``c``) the state, ``W``/``R``/``Wb``/``Rb`` the
gate's rows of the input and recurrent weights and biases, ``P`` the peepholes::

    LSTM (gates i, o, f, c):  i = sigmoid(x W_i + h R_i + Wb_i + Rb_i + P_i c)   (f likewise, P_f c)
                              g = tanh(x W_c + h R_c + Wb_c + Rb_c)
                              c' = f c + i g,   o = sigmoid(x W_o + h R_o + Wb_o + Rb_o + P_o c'),
                              h' = o tanh(c')
    GRU (gates z, r, h):      z = sigmoid(x W_z + h R_z + Wb_z + Rb_z)   (r likewise)
                              n = tanh(x W_h + Wb_h + r (h R_h + Rb_h))   (linear_before_reset = 1)
                              n = tanh(x W_h + Wb_h + (r h) R_h + Rb_h)   (linear_before_reset = 0)
                              h' = (1 - z) n + z h
    RNN:                      h' = tanh(x W + h R + Wb + Rb)   (or relu)

``clip`` clamps the gates' pre-activations to ``[-clip, clip]``: the input of every activation but
the LSTM's ``tanh(c')``, whose cell state onnxruntime passes unclipped (the ONNX text says "the
input of activations"; onnxruntime is what exporters and VNN-COMP run, and a clipped ``c'`` gave
outputs 0.1-0.2 apart from it with an initial cell state outside the clip range). A zero (or
absent) initial state drops the terms with it. A reverse direction runs from the last step to the
first and writes each step's state at its own time. Not translated, and reported by name: activations other than these
defaults, ``input_forget``, ``sequence_lens`` shorter than the sequence, weights computed from the
input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .capture import UnsupportedOperatorError
from .ir import Ref

aten = torch.ops.aten


@dataclass(frozen=True)
class Leading:
    """A value whose first ``depth`` axes come before the batch axis: ``parts`` is nested lists,
    ``depth`` levels deep, of batch-first IR values (:class:`Ref`), all of one shape. ``origin``
    names the ONNX node that moved the batch (for error messages)."""

    parts: list
    depth: int
    origin: str
    #: ``(x, perm)`` when the value is ``x`` (a batch-first Ref) with its axes permuted by ``perm`` and
    #: nothing else: a Transpose that brings the batch back then permutes ``x`` once
    permuted: tuple | None = None

    def sizes(self) -> list[int]:
        sizes, level = [], self.parts
        for _ in range(self.depth):
            sizes.append(len(level))
            level = level[0]
        return sizes

    def leaf(self, index: tuple[int, ...]) -> Ref:
        level = self.parts
        for i in index:
            level = level[i]
        return level


def nested(sizes: list[int], make) -> list | Any:
    """Nested lists of ``make(index)`` over every index of ``sizes`` (``make(())`` if there are none)."""
    if not sizes:
        return make(())
    return [nested(sizes[1:], lambda rest, i=i: make((i, *rest))) for i in range(sizes[0])]


def _as_leading(value, origin: str) -> Leading:
    if isinstance(value, Leading):
        return value
    if isinstance(value, Ref):
        return Leading(value, 0, origin)
    raise UnsupportedOperatorError([("a constant on a path whose batch dimension is not first", origin)])


def logical_shape(b, v: Leading) -> list[int]:
    return v.sizes() + list(b.example(v.leaf((0,) * v.depth)).shape)


def arrange(b, value, perm: list[int], src: str):
    """``value`` (a batch-first Ref or a :class:`Leading`) with its axes permuted by ``perm``.

    Axes that land before the batch index the lists (a list axis) or select from the leaves (a
    leaf axis); the list axes that land after it are stacked into the leaves; the leaves' axes are
    then permuted into the asked order. A result with the batch first is a plain Ref."""
    v = _as_leading(value, src)
    d = v.depth
    shape = logical_shape(b, v)
    batch_at = perm.index(d)
    base = (value, list(range(len(perm)))) if isinstance(value, Ref) else v.permuted
    composed = None if base is None else [base[1][a] for a in perm]
    if batch_at == 0 and composed is not None:  # back to batch first: one permute of the original, if any
        if composed == sorted(composed):
            return base[0]
        return b.emit(aten.permute.default, (base[0], composed), source=src, hint="transpose")
    before, after = perm[:batch_at], perm[batch_at + 1:]
    stacked = [a for a in range(d) if a not in before]
    picked = [a for a in before if a > d]  # leaf axes that move before the batch
    kept = [a for a in range(d + 1, len(shape)) if a not in picked]
    order = stacked + kept  # the result's leaf axes after the batch, as built
    moves = [order.index(a) + 1 for a in after]

    def leaf_at(index: tuple[int, ...]) -> Ref:
        fixed = dict(zip(before, index))

        def build(level: int, chosen: dict) -> Ref:
            if level == len(stacked):
                out = v.leaf(tuple(chosen.get(a, fixed.get(a)) for a in range(d)))
                for a in sorted(picked, reverse=True):  # highest leaf axis first: the lower ones keep their place
                    out = b.emit(aten.select.int, (out, a - d, fixed[a]), source=src, hint="select")
                return out
            axis = stacked[level]
            items = [build(level + 1, {**chosen, axis: i}) for i in range(shape[axis])]
            return b.emit(aten.stack.default, (items, 1), source=src, hint="stack")

        out = build(0, {})
        if moves != sorted(moves):
            out = b.emit(aten.permute.default, (out, [0, *moves]), source=src, hint="transpose")
        return out

    parts = nested([shape[a] for a in before], leaf_at)
    if batch_at == 0:
        return parts
    return Leading(parts, batch_at, v.origin if isinstance(value, Leading) else src,
                   None if composed is None else (base[0], composed))


def _map_leaves(v: Leading, fn) -> Leading:
    return Leading(nested(v.sizes(), lambda i: fn(v.leaf(i))), v.depth, v.origin)


def _out(v: Leading):
    """A translation's result: a plain Ref once no list axis is left."""
    return v.parts if v.depth == 0 else v


def _index_level(parts, level: int, pick):
    """``parts`` with list level ``level`` replaced by ``pick(list)`` (a list, or one item: a level fewer)."""
    if level == 0:
        return pick(parts)
    return [_index_level(p, level - 1, pick) for p in parts]


def _transpose(b, ins, attrs, src):
    (x,) = ins
    rank = len(logical_shape(b, x)) if isinstance(x, Leading) else b.example(x).dim()
    perm = list(attrs.get("perm", list(reversed(range(rank)))))
    return arrange(b, x, perm, src)


def _squeeze(b, ins, attrs, src, axes: list[int]):
    v = _as_leading(ins[0], src)
    shape = logical_shape(b, v)
    axes = sorted((a % len(shape) for a in axes), reverse=True) or [
        a for a in range(len(shape) - 1, -1, -1) if shape[a] == 1 and a != v.depth]
    for a in axes:
        if a < v.depth:
            v = Leading(_index_level(v.parts, a, lambda items: items[0]), v.depth - 1, v.origin)
        elif a == v.depth:
            raise UnsupportedOperatorError([("Squeeze of the batch dimension", src)])
        else:
            v = _map_leaves(v, lambda r, a=a - v.depth: b.emit(aten.squeeze.dims, (r, [a]), source=src, hint="squeeze"))
    return _out(v)


def _unsqueeze(b, ins, attrs, src, axes: list[int]):
    v = _as_leading(ins[0], src)
    rank = len(logical_shape(b, v)) + len(axes)
    for a in sorted(a % rank for a in axes):  # positions in the output, lowest first
        if a <= v.depth:  # a new list level of one item
            v = Leading(_index_level(v.parts, a, lambda items: [items]), v.depth + 1, v.origin)
        else:
            v = _map_leaves(v, lambda r, a=a - v.depth: b.emit(aten.unsqueeze.default, (r, a), source=src,
                                                                hint="unsqueeze"))
    return _out(v)


def _reshape(b, ins, attrs, src):
    """A reshape that keeps the list axes and the batch and reshapes the leaves (as after a
    bidirectional layer: ``(T, batch, 2, hidden) -> (T, batch, 2 hidden)``)."""
    v, shape = _as_leading(ins[0], src), ins[1]
    current = logical_shape(b, v)
    target = [int(t) for t in shape.tolist()] if torch.is_tensor(shape) else None
    if target is None:
        raise UnsupportedOperatorError([("Reshape to a shape computed from the input", src)])
    if not attrs.get("allowzero", 0):
        target = [current[i] if t == 0 else t for i, t in enumerate(target)]
    d = v.depth
    if target[:d] != current[:d] or len(target) <= d or target[d] != current[d]:
        raise UnsupportedOperatorError([("Reshape that moves axes across the batch dimension", src)])
    rest = target[d + 1:]
    return _out(_map_leaves(v, lambda r: b.emit(aten.reshape.default, (r, [b.batch_ref(r)] + rest), source=src,
                                                hint="reshape")))


def _gather(b, ins, attrs, src):
    v, index = _as_leading(ins[0], src), ins[1]
    if not torch.is_tensor(index) or index.dim() > 1:
        raise UnsupportedOperatorError([("Gather with indices computed from the input or multi-dimensional", src)])
    shape = logical_shape(b, v)
    axis = int(attrs.get("axis", 0)) % len(shape)
    if axis == v.depth:
        raise UnsupportedOperatorError([("Gather on the batch dimension", src)])
    index = index.long() % shape[axis]
    if axis < v.depth:
        if index.dim() == 0:
            i = int(index)
            return _out(Leading(_index_level(v.parts, axis, lambda items: items[i]), v.depth - 1, v.origin))
        picks = index.tolist()
        return Leading(_index_level(v.parts, axis, lambda items: [items[i] for i in picks]), v.depth, v.origin)
    leaf_axis = axis - v.depth
    if index.dim() == 0:
        return _out(_map_leaves(v, lambda r: b.emit(aten.select.int, (r, leaf_axis, int(index)), source=src,
                                                    hint="gather")))
    return _out(_map_leaves(v, lambda r: b.emit(aten.index_select.default, (r, leaf_axis, b.arg(index)),
                                                source=src, hint="gather")))


def _slice(b, ins, attrs, src, slice_leaf, starts, ends, axes, steps):
    v = _as_leading(ins[0], src)
    rank = len(logical_shape(b, v))
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis % rank
        if axis == v.depth:
            raise UnsupportedOperatorError([("Slice of the batch dimension", src)])
        if axis < v.depth:  # Python's slices clamp the ends as ONNX does, for either sign of step
            part = slice(start, end, step)
            v = Leading(_index_level(v.parts, axis, lambda items, part=part: items[part]), v.depth, v.origin)
        else:
            args = [[start], [end], [axis - v.depth], [step]]
            v = _map_leaves(v, lambda r, args=args: slice_leaf(b, [r, *args], {}, src))
    return _out(v)


def _concat(b, ins, attrs, src):
    if not all(isinstance(v, (Leading, Ref)) for v in ins):
        raise UnsupportedOperatorError([("Concat of a tensor whose batch dimension is not first with a constant",
                                         src)])
    ins = [_as_leading(v, src) for v in ins]
    if len({v.depth for v in ins}) != 1:
        raise UnsupportedOperatorError([("Concat of a tensor whose batch dimension is not first with another",
                                         src)])
    depth = ins[0].depth
    rank = len(logical_shape(b, ins[0]))
    axis = int(attrs["axis"]) % rank
    if axis == depth:
        raise UnsupportedOperatorError([("Concat along the batch dimension", src)])
    if axis < depth:
        def join(level: int, parts: list):
            if level == axis:
                return [item for p in parts for item in p]
            return [join(level + 1, [p[i] for p in parts]) for i in range(len(parts[0]))]

        return Leading(join(0, [v.parts for v in ins]), depth, ins[0].origin)
    sizes = ins[0].sizes()
    if any(v.sizes() != sizes for v in ins):
        raise UnsupportedOperatorError([("Concat of tensors of different shapes", src)])
    return _out(Leading(nested(sizes, lambda i: b.emit(aten.cat.default, ([v.leaf(i) for v in ins], axis - depth),
                                                       source=src, hint="concat")), depth, ins[0].origin))


def _shape(b, ins, attrs, src):
    shape = logical_shape(b, _as_leading(ins[0], src))
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return torch.tensor(shape[start:end], dtype=torch.int64)


# --- the recurrent layers -----------------------------------------------------------------------

_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


class _Steps:
    """Emits one recurrence's ops, folding the ones whose arguments are all constant."""

    def __init__(self, b, src: str, clip: float | None) -> None:
        self.b, self.src, self.clip = b, src, clip

    def op(self, target, *args):
        if not any(isinstance(a, Ref) for a in args):
            return target(*args)
        return self.b.emit(target, tuple(self.b.arg(a) if torch.is_tensor(a) else a for a in args), source=self.src)

    def linear(self, v, W: torch.Tensor, bias: torch.Tensor | None):
        return self.op(aten.linear.default, v, W, bias)

    def add(self, *terms):
        present = [t for t in terms if t is not None]
        out = present[0]
        for t in present[1:]:
            out = self.op(aten.add.Tensor, out, t)
        return out

    def mul(self, a, c):
        return None if a is None or c is None else self.op(aten.mul.Tensor, a, c)

    def act(self, name: str, v, clip: bool = True):
        if clip and self.clip is not None:
            v = self.op(aten.clamp.default, v, -self.clip, self.clip)
        target = {"Sigmoid": aten.sigmoid.default, "Tanh": aten.tanh.default, "Relu": aten.relu.default}[name]
        return self.op(target, v)


def _state(b, value, direction: int, layout: int, src: str):
    """The initial state of one direction, ``(batch, hidden)`` (a Ref or a constant), or None when zero."""
    if value is None:
        return None
    if torch.is_tensor(value):
        state = value[:, direction] if layout else value[direction]
        if not bool(state.any()):
            return None
        if state.shape[0] != 1:  # a constant tied to the example's batch size
            raise UnsupportedOperatorError([("recurrent layer with a constant initial state per example", src)])
        return state
    if layout:
        return b.emit(aten.select.int, (value, 1, direction), source=src, hint="state")
    if isinstance(value, Leading) and value.depth == 1:
        return value.parts[direction]
    raise UnsupportedOperatorError([("recurrent layer whose initial state's batch dimension is not second", src)])


def _inputs_over_time(b, x, layout: int, src: str) -> list:
    """The steps of the input, each ``(batch, in)``."""
    if layout:
        if not isinstance(x, Ref):
            raise UnsupportedOperatorError([("recurrent layer (layout 1) whose input is not batch first", src)])
        return [b.emit(aten.select.int, (x, 1, t), source=src, hint="step") for t in range(b.example(x).shape[1])]
    if isinstance(x, Leading) and x.depth == 1:
        return list(x.parts)
    raise UnsupportedOperatorError([("recurrent layer whose time-major input has its batch dimension first "
                                     "(a model input that is time-major)", src)])


@dataclass
class _Gates:
    """One direction's weights, per gate (ONNX's order): rows of ``W``, of ``R``, the biases ``Wb``, ``Rb``,
    and the peepholes ``(P_i, P_o, P_f)`` (None when absent or zero)."""

    w: list[torch.Tensor]
    r: list[torch.Tensor]
    wb: list[torch.Tensor]
    rb: list[torch.Tensor]
    peep: list[torch.Tensor] | None

    @classmethod
    def of(cls, W, R, B, P, d: int, gates: int, hidden: int) -> _Gates:
        def rows(t: torch.Tensor) -> list[torch.Tensor]:
            return [t[g * hidden:(g + 1) * hidden] for g in range(len(t) // hidden)]

        Bd = B[d].float() if B is not None else torch.zeros(2 * gates * hidden)
        peep = rows(P[d].float()) if P is not None and bool(P[d].any()) else None
        return cls(rows(W[d].float()), rows(R[d].float()), rows(Bd[:gates * hidden]), rows(Bd[gates * hidden:]), peep)

    def pre(self, s: _Steps, x, h, g: int, recurrent_bias: bool = True):
        """``x W_g + h R_g + Wb_g (+ Rb_g)``, the terms with ``h`` left out when it is None."""
        bias = self.wb[g] + self.rb[g] if recurrent_bias else self.wb[g]
        return s.add(s.linear(x, self.w[g], bias), None if h is None else s.linear(h, self.r[g], None))


def _lstm_step(s: _Steps, k: _Gates, act: list[str], x, h, c):
    def peephole(j, cell):  # P (i, o, f) times the cell
        return None if k.peep is None else s.mul(cell, k.peep[j])

    i = s.act(act[0], s.add(k.pre(s, x, h, 0), peephole(0, c)))
    f = s.act(act[0], s.add(k.pre(s, x, h, 2), peephole(2, c)))
    c = s.add(s.mul(f, c), s.mul(i, s.act(act[1], k.pre(s, x, h, 3))))
    o = s.act(act[0], s.add(k.pre(s, x, h, 1), peephole(1, c)))
    return s.mul(o, s.act(act[2], c, clip=False)), c


def _gru_step(s: _Steps, k: _Gates, act: list[str], x, h, linear_before_reset: bool):
    z, r = (s.act(act[0], k.pre(s, x, h, g)) for g in (0, 1))
    if linear_before_reset:
        recur = k.rb[2] if h is None else s.linear(h, k.r[2], k.rb[2])
        n = s.act(act[1], s.add(s.linear(x, k.w[2], k.wb[2]), s.mul(r, recur)))
    else:
        n = s.act(act[1], k.pre(s, x, None if h is None else s.mul(r, h), 2))
    return s.add(s.mul(s.op(aten.rsub.Scalar, z, 1.0), n), s.mul(z, h))


def _check_settings(kind: str, attrs: dict, dirs: int, weights, lens, steps: int, src: str) -> list[str]:
    """The activations to use; raises naming every setting that is not translated."""
    problems = []
    activations = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    defaults = _DEFAULT_ACTIVATIONS[kind] * dirs
    if activations and activations != defaults and not (kind == "RNN" and set(activations) <= {"Tanh", "Relu"}):
        problems.append(f"{kind} with activations {activations}")
    if int(attrs.get("input_forget", 0)):
        problems.append("LSTM with input_forget")
    if not all(torch.is_tensor(t) or t is None for t in weights):
        problems.append(f"{kind} with weights computed from the input")
    if lens is not None and (not torch.is_tensor(lens) or bool((lens != steps).any())):
        problems.append(f"{kind} with sequence_lens shorter than the sequence")
    if problems:
        raise UnsupportedOperatorError([(p, src) for p in problems])
    return activations or defaults


def recurrent(kind: str):
    """The translation of ONNX ``kind`` (``"LSTM"``, ``"GRU"``, ``"RNN"``): a list of its outputs."""

    def tr(b, ins, attrs, src):
        x, W, R, B, lens, h0, c0, P = (list(ins) + [None] * 8)[:8]
        layout, hidden = int(attrs.get("layout", 0)), int(attrs["hidden_size"])
        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        dirs = 2 if direction == "bidirectional" else 1
        steps = _inputs_over_time(b, x, layout, src)
        acts = _check_settings(kind, attrs, dirs, (W, R, B, P), lens, len(steps), src)
        s = _Steps(b, src, float(attrs["clip"]) if "clip" in attrs else None)
        ys, hs, cs = [], [], []
        for d in range(dirs):
            k = _Gates.of(W, R, B, P, d, _GATES[kind], hidden)
            act = acts[len(acts) // dirs * d:]
            h, c = _state(b, h0, d, layout, src), (_state(b, c0, d, layout, src) if kind == "LSTM" else None)
            out = [None] * len(steps)
            backwards = direction == "reverse" or d == 1
            for t in (range(len(steps) - 1, -1, -1) if backwards else range(len(steps))):
                if kind == "LSTM":
                    h, c = _lstm_step(s, k, act, steps[t], h, c)
                elif kind == "GRU":
                    h = _gru_step(s, k, act, steps[t], h, bool(int(attrs.get("linear_before_reset", 0))))
                else:
                    h = s.act(act[0], k.pre(s, steps[t], h, 0))
                out[t] = h
            ys.append(out)
            hs.append(h)
            cs.append(c)
        if layout:  # batch first: Y (batch, T, dirs, hidden), Y_h and Y_c (batch, dirs, hidden)
            def stack(items):
                return b.emit(aten.stack.default, (items, 1), source=src, hint="stack")

            y = stack([stack([ys[d][t] for d in range(dirs)]) for t in range(len(steps))])
            return [y, stack(hs)] + ([stack(cs)] if kind == "LSTM" else [])
        y = Leading([[ys[d][t] for d in range(dirs)] for t in range(len(steps))], 2, src)
        return [y, Leading(hs, 1, src)] + ([Leading(cs, 1, src)] if kind == "LSTM" else [])

    return tr


def leading_translations(axes_of, slice_args_of, slice_leaf) -> dict:
    """The translations that accept :class:`Leading` inputs, by ONNX op type. ``axes_of(ins, attrs)`` and
    ``slice_args_of(ins, attrs)`` read Squeeze/Unsqueeze's and Slice's arguments as the importer does;
    ``slice_leaf`` is its Slice translation (for slices of the leaves)."""
    return {
        "Transpose": _transpose,
        "Squeeze": lambda b, ins, attrs, src: _squeeze(b, ins, attrs, src, axes_of(ins, attrs)),
        "Unsqueeze": lambda b, ins, attrs, src: _unsqueeze(b, ins, attrs, src, axes_of(ins, attrs)),
        "Gather": _gather,
        "Slice": lambda b, ins, attrs, src: _slice(b, ins, attrs, src, slice_leaf, *slice_args_of(ins, attrs)),
        "Concat": _concat,
        "Reshape": _reshape,
        "Shape": _shape,
        "Identity": lambda b, ins, attrs, src: ins[0],
        "LSTM": recurrent("LSTM"), "GRU": recurrent("GRU"), "RNN": recurrent("RNN"),
    }
