"""Certified accuracy of a classifier on a data set, for a list of perturbation radii.

A sample counts as *certified* at radius ``eps`` by a method when the model classifies it
correctly and the method proves that every input of the ball (L-inf, L2 or L1, intersected with
the ``clip`` box) keeps that class: every margin ``y_label - y_j`` has a lower bound above
``margin`` (1e-6, the verifier's guard against rounding). Bounds are computed in float64 (the
network's constants are cast to float64 as the verifier does).

Methods:

* any bound method of :func:`boundprop.compute_bounds` (``CROWN``, ``alpha-CROWN``, ``IBP``, ...):
  one call per batch of samples, incomplete (``not certified`` means *not proved*). alpha-CROWN
  is at least as tight as CROWN, so it runs only on the samples CROWN leaves open (its margin
  bound is the larger of the two);
* ``complete``: :func:`boundprop.verify` on the property "some other class reaches the label's
  score" over the input box (L-inf only), after a CROWN bound that settles the easy samples. The
  result is ``certified`` (``unsat``), ``falsified`` (a counterexample, checked on the model; it
  also lies in every larger ball, so larger radii are ``falsified`` without a search), or
  ``timeout``/``unknown`` after ``timeout`` seconds per sample and radius.

:func:`certify_batch` does one batch of samples for every radius and method; ``boundprop certify``
runs it over the batches of a data set, in this process or as Ray tasks (the same batches either
way, so the numbers are the same). :class:`ModelSource` travels to Ray workers, and the network
built from it is cached per process.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

COMPLETE = "complete"
RESULTS = ("certified", "not certified", "misclassified", "falsified", "timeout", "unknown", "error")


@dataclass(frozen=True)
class CertifyOptions:
    """Radii, methods (canonical bound methods and/or ``"complete"``), norm, clip box and the
    time limit of ``complete`` per sample and radius."""

    eps: tuple[float, ...]
    methods: tuple[str, ...] = ("crown", "alpha-crown")
    norm: float = math.inf
    clip: tuple[float, float] | None = (0.0, 1.0)
    timeout: float = 10.0
    margin: float = 1e-6

    def __post_init__(self) -> None:
        if not self.eps or any(e < 0 for e in self.eps):
            raise ValueError(f"radii must be >= 0, got {list(self.eps)}")
        if COMPLETE in self.methods and self.norm != math.inf:
            raise ValueError("complete verification splits input boxes: it needs the L-inf norm")
        if self.timeout <= 0:
            raise ValueError(f"the timeout must be > 0, got {self.timeout}")


@dataclass
class ModelSource:
    """The model in a form any process can rebuild: an ``nn.Module`` or the bytes of an ONNX file.

    ``input_shape`` is ``(1, *sample shape)``; ``device`` is where the network is built (bounds and
    searches run there; None: the module's device, the CPU for ONNX). ``token`` names this model in
    the per-process cache."""

    input_shape: tuple[int, ...]
    module: Any = None
    onnx: bytes | None = None
    name: str = "model"
    device: str | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def network(self) -> Any:
        """The :class:`~boundprop.bab.verifier.Network` (built once per process)."""
        net = _NETWORKS.get(self.token)
        if net is None:
            if self.onnx is not None:
                from .distributed.ray_bench import network_from_bytes

                net = network_from_bytes(self.name, self.onnx, self.device)
            else:
                from .bab.verifier import load_network

                net = load_network(self.module, tuple(self.input_shape), device=self.device)
            _NETWORKS.clear()  # one model at a time
            _NETWORKS[self.token] = net
        return net


_NETWORKS: dict[str, Any] = {}


@dataclass(frozen=True)
class Record:
    """One (sample, radius, method): ``result`` in :data:`RESULTS`, the smallest margin lower bound
    (NaN when not computed) and the seconds spent (a batch call's time split over its samples)."""

    index: int
    eps: float
    method: str
    result: str
    margin_lb: float
    time_s: float

    @property
    def certified(self) -> bool:
        return self.result == "certified"


def _balls(x: torch.Tensor, eps: float, opts: CertifyOptions):
    from . import PerturbationLpNorm

    box = {}
    if opts.clip is not None:
        box = {"x_L": torch.full_like(x, opts.clip[0]), "x_U": torch.full_like(x, opts.clip[1])}
    return PerturbationLpNorm(eps, opts.norm, **box)


def _margin_bounds(net: Any, x: torch.Tensor, labels: torch.Tensor, eps: float, method: str,
                   opts: CertifyOptions) -> torch.Tensor:
    """Smallest lower bound of the margins ``y_label - y_j`` per sample (``(n,)``, float64)."""
    from . import compute_bounds
    from .spec import margin_matrix

    graph = net.bound_graph
    xs = x.to(net.dtype).reshape(-1, *net.input_shape[1:])
    n_out = int(net.forward(xs[:1].reshape(1, -1)).shape[1])
    C = margin_matrix(labels, n_out, dtype=net.dtype)
    res = compute_bounds(graph, (xs,), {graph.inputs[0]: _balls(xs, eps, opts)}, method=method, C=C, upper=False,
                         params=net.params)
    return res.lower.detach().reshape(xs.shape[0], -1).amin(1)


def margin_property(x: torch.Tensor, label: int, n_out: int, eps: float, clip: tuple[float, float] | None):
    """The VNN-LIB-style property "some class ``j != label`` scores at least as high as ``label``"
    over the L-inf ball of radius ``eps`` around ``x`` (clipped): ``unsat`` means robust."""
    from .spec.vnnlib import Disjunct, Property, Region

    flat = x.reshape(-1).to("cpu", torch.float64)  # properties live on the host, as parsed ones do
    lower, upper = flat - eps, flat + eps
    if clip is not None:
        lower, upper = lower.clamp(clip[0], clip[1]), upper.clamp(clip[0], clip[1])
    disjuncts = []
    for j in range(n_out):
        if j != label:
            row = torch.zeros(1, n_out, dtype=torch.float64, device="cpu")
            row[0, label], row[0, j] = 1.0, -1.0  # y_label - y_j <= 0
            disjuncts.append(Disjunct(row, torch.zeros(1, dtype=torch.float64, device="cpu")))
    return Property(flat.numel(), n_out, [Region(lower, upper, disjuncts)], "margin")


def certify_batch(source: ModelSource, indices: Sequence[int], x: torch.Tensor, labels: torch.Tensor,
                  opts: CertifyOptions, threads: int | None = None) -> list[Record]:
    """Every (sample, radius, method) of one batch. ``x``: ``(n, *sample shape)``, ``labels``: ``(n,)``."""
    from .bab.verifier import verify

    if threads:
        torch.set_num_threads(threads)
    net = source.network()
    indices = [int(i) for i in indices]
    x, labels = x.to(net.device), labels.reshape(-1).long().to(net.device)
    out: list[Record] = []
    with torch.no_grad():
        logits = net.forward(x.reshape(x.shape[0], -1).to(net.dtype))
    correct = (logits.argmax(1) == labels).nonzero().flatten()
    n_out = logits.shape[1]
    for k in (~(logits.argmax(1) == labels)).nonzero().flatten().tolist():
        out += [Record(indices[k], e, m, "misclassified", math.nan, 0.0) for e in opts.eps for m in opts.methods]
    if correct.numel() == 0:
        return out
    xc, yc = x[correct], labels[correct]
    falsified: set[int] = set()  # positions in `correct` with a counterexample at a smaller radius
    for eps in sorted(opts.eps):
        crown: tuple[torch.Tensor, float] | None = None
        if any(m in ("crown", "alpha-crown", COMPLETE) for m in opts.methods):  # cheap; settles the easy samples
            t = time.perf_counter()
            lb = _margin_bounds(net, xc, yc, eps, "crown", opts)
            crown = (lb, (time.perf_counter() - t) / xc.shape[0])
        for method in opts.methods:
            if method == COMPLETE:
                continue
            if method == "crown":
                lb, share = crown
            elif method == "alpha-crown":  # only where CROWN (which it never loosens) proves nothing
                lb, share = crown[0].clone(), crown[1]
                todo = (lb <= opts.margin).nonzero().flatten()
                if todo.numel():
                    t = time.perf_counter()
                    lb[todo] = torch.maximum(lb[todo], _margin_bounds(net, xc[todo], yc[todo], eps, method, opts))
                    share += (time.perf_counter() - t) / xc.shape[0]
            else:
                t = time.perf_counter()
                lb = _margin_bounds(net, xc, yc, eps, method, opts)
                share = (time.perf_counter() - t) / xc.shape[0]
            out += [Record(indices[int(correct[k])], eps, method,
                           "certified" if float(lb[k]) > opts.margin else "not certified", float(lb[k]), share)
                    for k in range(xc.shape[0])]
        if COMPLETE not in opts.methods:
            continue
        lb, share = crown
        for k in range(xc.shape[0]):
            index = indices[int(correct[k])]
            if k in falsified:
                out.append(Record(index, eps, COMPLETE, "falsified", float(lb[k]), 0.0))
                continue
            if float(lb[k]) > opts.margin:
                out.append(Record(index, eps, COMPLETE, "certified", float(lb[k]), share))
                continue
            t = time.perf_counter()
            prop = margin_property(xc[k], int(yc[k]), n_out, eps, opts.clip)
            verdict = verify(net, prop, timeout=opts.timeout).verdict
            result = {"unsat": "certified", "sat": "falsified"}.get(verdict, verdict)
            if result == "falsified":
                falsified.add(k)
            out.append(Record(index, eps, COMPLETE, result, float(lb[k]), share + time.perf_counter() - t))
    return out


@dataclass
class Summary:
    """Certified counts per (radius, method) over ``n`` samples, and the clean accuracy."""

    n: int
    correct: int
    certified: dict[tuple[float, str], int]
    counts: dict[tuple[float, str], dict[str, int]]
    time_s: dict[str, float]

    def accuracy(self, eps: float, method: str) -> float:
        return self.certified.get((eps, method), 0) / max(1, self.n)


def summarise(records: Iterable[Record], opts: CertifyOptions) -> Summary:
    records = list(records)
    samples = {r.index for r in records}
    wrong = {r.index for r in records if r.result == "misclassified"}
    certified: dict[tuple[float, str], int] = {}
    counts: dict[tuple[float, str], dict[str, int]] = {}
    time_s: dict[str, float] = {}
    for r in records:
        key = (r.eps, r.method)
        certified[key] = certified.get(key, 0) + int(r.certified)
        bucket = counts.setdefault(key, {})
        bucket[r.result] = bucket.get(r.result, 0) + 1
        time_s[r.method] = time_s.get(r.method, 0.0) + r.time_s
    return Summary(len(samples), len(samples) - len(wrong), certified, counts, time_s)


__all__ = ["COMPLETE", "CertifyOptions", "ModelSource", "Record", "Summary", "certify_batch", "margin_property",
           "summarise"]
