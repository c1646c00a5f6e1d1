"""The complete verifier: falsify, bound, then branch and bound, per input region of a property.

Order of work per region (a box of inputs with output disjuncts ``A_d y <= b_d``):

1. attack: PGD with restarts on the violation ``min_d max_i (A_d y - b_d)_i``;
2. bounds: CROWN lower bounds of every row of every ``A_d y - b_d`` on the box; a disjunct is
   refuted when one of its rows is provably positive;
3. branch and bound on the input box (input splitting, for low-dimensional inputs): unrefuted
   boxes are halved along the input dimension with the largest bound sensitivity
   ``width_j * sum_rows |A_ij|``, many boxes bounded per batch; candidate counterexamples (box
   centres, and the box corners that minimise each row's linear lower bound) are tried on the way.

Soundness guards:

* ``unsat`` is claimed only for rows whose lower bound exceeds ``b`` by a margin
  (``margin_abs + margin_rel * |b|``), with bounds computed in float64 for imported ONNX models;
* ``sat`` is claimed only after the counterexample is re-evaluated on the original model (the ONNX
  file through onnxruntime when there is one) and satisfies the property with no tolerance;
* the clock is checked between batches; past the deadline the answer is ``timeout``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..algorithms import compute_bounds
from ..graph.ir import Graph, ParamSource, evaluate
from ..perturbation import PerturbationLpNorm
from ..spec.vnnlib import Property, Region, read_vnnlib
from .attack import pgd_attack, violation


@dataclass
class VerificationResult:
    """Verdict (``sat``, ``unsat``, ``timeout``, ``unknown``), counterexample, time and statistics."""

    verdict: str
    counterexample: tuple[torch.Tensor, torch.Tensor] | None = None
    time_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    def vnncomp_text(self) -> str:
        """The VNN-COMP result file: the verdict, then ``((X_0 v) ... (Y_0 v) ...)`` for ``sat``."""
        if self.verdict != "sat" or self.counterexample is None:
            return f"{self.verdict}\n"
        x, y = self.counterexample
        pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x.reshape(-1).tolist())]
        pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y.reshape(-1).tolist())]
        return "sat\n(" + "\n".join(pairs) + ")\n"


@dataclass
class VerifierOptions:
    batch_size: int = 2048
    method: str = "CROWN"
    margin_abs: float = 1e-7
    margin_rel: float = 1e-7
    attack_steps: int = 50
    attack_restarts: int = 8
    max_input_split_dims: int = 64
    float64: bool = True
    seed: int = 0


def graph_to_dtype(graph: Graph, dtype: torch.dtype) -> Graph:
    """A copy of an imported graph with every floating constant cast to ``dtype``."""
    params = {name: ParamSource(src.qualname, src.kind,
                                src.constant.to(dtype) if src.constant is not None and src.constant.is_floating_point()
                                else src.constant)
              for name, src in graph.params.items()}
    return Graph(graph.nodes, graph.inputs, params, graph.output, graph.module, graph.input_shapes)


class _Checker:
    """Re-evaluates candidates on the original model (onnxruntime for ONNX files)."""

    def __init__(self, onnx_path: Path | None, graph: Graph, input_shape: tuple[int, ...]) -> None:
        self.input_shape = input_shape
        self.graph = graph
        self.session = None
        if onnx_path is not None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (flattened, float64) of the original model at one input ``x`` (any shape, n entries)."""
        if self.session is not None:
            feed = x.reshape(1, *self.input_shape[1:]).to(torch.float32).numpy()
            return torch.from_numpy(self.session.run(None, {self.input_name: feed})[0]).reshape(-1).double()
        with torch.no_grad():
            value = evaluate(self.graph, (x.reshape(1, *self.input_shape[1:]).to(torch.float32),))[self.graph.output]
        return value.reshape(-1).double()

    def confirm(self, x: torch.Tensor, region: Region) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x, y)`` when ``x`` (float32) lies in the box and ``y`` satisfies some disjunct exactly."""
        x32 = torch.minimum(torch.maximum(x.reshape(-1).double(), region.lower), region.upper).to(torch.float32)
        x64 = x32.double()
        if (x64 < region.lower).any() or (x64 > region.upper).any():
            return None
        y = self.outputs(x32)
        for d in region.disjuncts:
            if bool((d.A @ y <= d.b).all()):
                return x32, y.to(torch.float32)
        return None


def _load(model: Any, input_shape: tuple[int, ...] | None):
    from .. import capture, load_onnx

    if isinstance(model, (str, Path)):
        path = Path(model)
        graph = load_onnx(path)
        return graph, path, tuple(graph.input_shapes[0])
    if isinstance(model, Graph):
        return model, None, tuple(input_shape or model.input_shapes[0])
    if input_shape is None:
        raise ValueError("verifying an nn.Module needs input_shape (batch dimension included)")
    graph = capture(model, (torch.zeros(input_shape),))
    return graph, None, tuple(input_shape)


def verify(model: Any, spec: Property | str | Path, timeout: float = 60.0, *, input_shape: tuple[int, ...] | None = None,
           options: VerifierOptions | None = None, log: Callable[[str], None] | None = None) -> VerificationResult:
    """Decide a VNN-LIB property for a model.

    Arguments:
        model: a path to an ``.onnx`` file, a captured :class:`Graph`, or an ``nn.Module`` (then give
            ``input_shape``).
        spec: a :class:`Property` or a path to a ``.vnnlib`` file.
        timeout: seconds; the verdict is ``timeout`` when the search is not finished by then.
    Returns:
        a :class:`VerificationResult`.
    """
    start = time.perf_counter()
    deadline = start + timeout
    opts = options or VerifierOptions()
    prop = read_vnnlib(spec) if isinstance(spec, (str, Path)) else spec
    graph, onnx_path, shape = _load(model, input_shape)
    n_inputs = int(math.prod(shape[1:]))
    if n_inputs != prop.n_inputs:
        raise ValueError(f"the property has {prop.n_inputs} inputs but the model takes {n_inputs}")
    checker = _Checker(onnx_path, graph, shape)
    dtype = torch.float64 if (opts.float64 and graph.module is None) else torch.float32
    bound_graph = graph_to_dtype(graph, dtype) if dtype == torch.float64 else graph
    stats: dict[str, Any] = {"regions": len(prop.regions), "boxes": 0, "bound_calls": 0, "attack_s": 0.0}
    torch.manual_seed(opts.seed)
    verdict = "unsat"
    with torch.no_grad():
        for region in prop.regions:
            if not region.disjuncts:
                continue
            outcome, cex = _verify_region(bound_graph, checker, region, shape, dtype, deadline, opts, stats, log)
            if outcome == "sat":
                return VerificationResult("sat", cex, time.perf_counter() - start, stats)
            if outcome != "unsat":
                verdict = outcome if verdict == "unsat" or outcome == "timeout" else verdict
    return VerificationResult(verdict, None, time.perf_counter() - start, stats)


def _spec_rows(region: Region, dtype: torch.dtype):
    A = torch.cat([d.A for d in region.disjuncts]).to(dtype)
    b = torch.cat([d.b for d in region.disjuncts]).to(dtype)
    groups = torch.cat([torch.full((len(d.b),), i, dtype=torch.long) for i, d in enumerate(region.disjuncts)])
    return A, b, groups


def _attack(graph: Graph, checker: _Checker, region: Region, lower, upper, shape, A, b, groups, opts, stats):
    t = time.perf_counter()
    n_groups = int(groups.max()) + 1
    fn = lambda x: evaluate(graph, (x,))[graph.output].reshape(x.shape[0], -1)
    objective = lambda y: violation(y, A, b, groups, n_groups)
    x, v = pgd_attack(fn, lower, upper, objective, opts.attack_steps, opts.attack_restarts)
    stats["attack_s"] += time.perf_counter() - t
    order = torch.argsort(v)[:8]
    for i in order.tolist():
        if v[i] <= 1e-6:
            cex = checker.confirm(x[i], region)
            if cex is not None:
                return cex
    return None


def _verify_region(graph: Graph, checker: _Checker, region: Region, shape, dtype, deadline: float,
                   opts: VerifierOptions, stats: dict, log) -> tuple[str, Any]:
    A, b, groups = _spec_rows(region, dtype)
    n_groups = int(groups.max()) + 1
    lower = region.lower.to(dtype).reshape(1, *shape[1:])
    upper = region.upper.to(dtype).reshape(1, *shape[1:])
    cex = _attack(graph, checker, region, lower, upper, shape, A, b, groups, opts, stats)
    if cex is not None:
        return "sat", cex
    n_inputs = lower[0].numel()
    split_allowed = n_inputs <= opts.max_input_split_dims
    queue_lo, queue_hi = lower, upper
    margin = opts.margin_abs + opts.margin_rel * b.abs()
    iteration = 0
    while queue_lo.shape[0] > 0:
        if time.perf_counter() > deadline:
            return "timeout", None
        iteration += 1
        take = min(opts.batch_size, queue_lo.shape[0])
        lo, hi = queue_lo[-take:], queue_hi[-take:]
        queue_lo, queue_hi = queue_lo[:-take], queue_hi[:-take]
        center = (lo + hi) / 2
        C = A.unsqueeze(0).expand(lo.shape[0], -1, -1)
        res = compute_bounds(graph, (center,), {graph.inputs[0]: PerturbationLpNorm(x_L=lo, x_U=hi)},
                             method=opts.method, C=C, upper=False, need_A=[graph.inputs[0]])
        stats["bound_calls"] += 1
        stats["boxes"] += lo.shape[0]
        proved_rows = res.lower - b > margin  # (boxes, rows)
        refuted = torch.zeros(lo.shape[0], n_groups, dtype=torch.bool)
        refuted = refuted.scatter_reduce(1, groups.expand(lo.shape[0], -1), proved_rows, reduce="amax")
        open_boxes = ~refuted.all(1)
        if not bool(open_boxes.any()):
            continue
        lo, hi = lo[open_boxes], hi[open_boxes]
        lA = res.A[graph.inputs[0]]["lA"][open_boxes]  # (boxes, rows, *shape)
        row_open = ~proved_rows[open_boxes] & ~refuted[open_boxes][:, groups]
        cex = _try_candidates(graph, checker, region, lo, hi, lA, A, b, groups, n_groups)
        if cex is not None:
            return "sat", cex
        if not split_allowed:
            return "unknown", None
        if iteration % 20 == 0:
            cex = _attack(graph, checker, region, lo[:64], hi[:64], shape, A, b, groups, opts, stats)
            if cex is not None:
                return "sat", cex
        new_lo, new_hi = _split(lo, hi, lA, row_open)
        queue_lo = torch.cat([queue_lo, new_lo])
        queue_hi = torch.cat([queue_hi, new_hi])
        if log is not None and iteration % 50 == 0:
            log(f"iteration {iteration}: {queue_lo.shape[0]} open boxes, {stats['boxes']} bounded")
    return "unsat", None


def _try_candidates(graph, checker, region, lo, hi, lA, A, b, groups, n_groups):
    """Box centres and the corners minimising each open row's linear lower bound."""
    boxes, rows = lA.shape[0], lA.shape[1]
    corners = torch.where(lA > 0, lo.unsqueeze(1), hi.unsqueeze(1)).reshape(boxes * rows, *lo.shape[1:])
    points = torch.cat([(lo + hi) / 2, corners])
    y = evaluate(graph, (points,))[graph.output].reshape(points.shape[0], -1)
    v = violation(y, A, b, groups, n_groups)
    for i in torch.argsort(v)[:4].tolist():
        if v[i] <= 1e-6:
            cex = checker.confirm(points[i], region)
            if cex is not None:
                return cex
    return None


def _split(lo: torch.Tensor, hi: torch.Tensor, lA: torch.Tensor, row_open: torch.Tensor):
    """Halve every box along its most influential dimension: ``argmax_j width_j * sum_open |lA_j|``."""
    width = (hi - lo).reshape(lo.shape[0], -1)
    weight = (lA.abs() * row_open.reshape(*row_open.shape, *[1] * (lA.dim() - 2))).sum(1).reshape(lo.shape[0], -1)
    score = width * (weight + 1e-12 * weight.amax(1, keepdim=True).clamp_min(1e-30))
    score = torch.where(width > 0, score, torch.full_like(score, -1.0))
    dim = score.argmax(1)
    flat_lo, flat_hi = lo.reshape(lo.shape[0], -1), hi.reshape(hi.shape[0], -1)
    rows = torch.arange(lo.shape[0])
    mid = (flat_lo[rows, dim] + flat_hi[rows, dim]) / 2
    left_hi, right_lo = flat_hi.clone(), flat_lo.clone()
    left_hi[rows, dim] = mid
    right_lo[rows, dim] = mid
    new_lo = torch.cat([flat_lo, right_lo]).reshape(-1, *lo.shape[1:])
    new_hi = torch.cat([left_hi, flat_hi]).reshape(-1, *lo.shape[1:])
    return new_lo, new_hi
