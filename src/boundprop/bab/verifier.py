"""The complete verifier: falsify, bound, then branch and bound, per input region of a property.

Order of work per region (a box of inputs with output disjuncts ``A_d y <= b_d``):

1. attack: PGD with restarts on the violation ``min_d max_i (A_d y - b_d)_i``;
2. if at most ``max_input_split_dims`` inputs are free in the box (inputs pinned to one value do
   not count): input-splitting branch and bound (:mod:`boundprop.bab.search`). Networks that are
   chains of affine maps and ReLUs (most VNN-COMP networks) are bounded by the dedicated CROWN of
   :mod:`boundprop.bab.chain` (pinned inputs folded into the first layer, intermediate intervals
   inherited from the parent box, an optimised bound per disjunct for boxes CROWN leaves open,
   branching on the estimated rise of the bounds, more attacks inside promising boxes and, when
   the search lasts, wide attacks on the whole region); other graphs by
   :func:`boundprop.compute_bounds` (``method``);
3. otherwise, for ReLU chains (``relu_split``): CROWN, ``root_method`` and branch and bound on
   ReLU splits with beta-CROWN (:mod:`boundprop.bab.relu_split`) until proved, falsified or out
   of time; for other graphs one bound of the whole box with ``root_method`` (alpha-CROWN by
   default): ``unsat`` when it refutes every disjunct, else ``unknown`` (after trying the corners
   its linear bounds point to).

A region is refuted when no input of its box satisfies any of its disjuncts; the property is
``unsat`` when every region is refuted, ``sat`` as soon as a counterexample is confirmed.

Soundness guards:

* floating point: every bound behind an ``unsat`` claim is computed in float64 (ONNX weights are
  float32 and a module's parameters are copied to float64, so the network itself is represented
  exactly); a disjunct counts as refuted only when a row's lower bound exceeds its right-hand side
  by the margin ``margin_abs + margin_rel * |b|`` (1e-6 each by default). The rounding error of
  a float64 CROWN bound is a few units of 1e-16 relative per operation on sums of at most a few
  thousand terms, below 1e-9 for the magnitudes of these networks (outputs up to ~1e3), so the
  margin covers it with orders of magnitude to spare. The same margin absorbs rounding in the
  box clipping of the search (:func:`~boundprop.bab.search.clip_boxes`). The dense matrices of the
  ReLU chain are checked against the graph at random points (relative error <= 1e-9) before use;
* ``sat`` is claimed only after the counterexample (clipped into the box, kept in float64) is
  re-evaluated on the original model -- the ONNX file through onnxruntime, on the input cast to
  float32 as VNN-COMP's checker does -- and satisfies the property with no tolerance;
* a box that shrinks to a single input without being refuted makes the answer ``unknown``, never
  ``unsat``; the clock is checked between batches, and past the deadline the answer is ``timeout``.

Devices: a :class:`Network` runs its bounds, searches and attacks on one device (the CPU by
default; ``VerifierOptions.device`` or ``--device cuda``). Every tensor is made on it, except the
linear programs of :func:`~boundprop.bab.relu_split.finish_with_lp` (scipy, on the CPU) and the
counterexample check; ``tests/test_verifier.py`` runs every path with ``meta`` as the default
device, so that a tensor made without a device fails there instead of on a GPU. Random draws use
the CPU's generator whatever the device, so verdicts do not depend on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import module_device, resolve_device
from ..graph.ir import Graph, evaluate
from ..spec.vnnlib import Property, Region, read_vnnlib
from .attack import pgd_attack, violation
from .chain import MAX_ENTRIES, ReluChain, extract_relu_chain, restrict_chain
from .search import ChainSearch, Confirmer, GraphSearch, SearchLimits, refuted_groups

VERDICTS = ("sat", "unsat", "timeout", "unknown")


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
    """Knobs of :func:`verify` (the defaults are tuned on ACAS Xu)."""

    batch_size: int = 512
    method: str = "CROWN"  # bounds in branch and bound for graphs that are not ReLU chains
    root_method: str = "alpha-CROWN"  # the one bound of a region too wide to split
    margin_abs: float = 1e-6
    margin_rel: float = 1e-6
    attack_steps: int = 50
    attack_restarts: int = 64
    max_input_split_dims: int = 64
    optimise_iterations: int = 20
    deep_attack_macs: int = 50_000_000  # budget of the wide attack run once a search lasts 2 s
    deep_attack_max_restarts: int = 4096
    use_chain: bool = True
    float64: bool = True
    seed: int = 0
    relu_split: bool = True  # regions too wide to split inputs: ReLU-split BaB (:mod:`boundprop.bab.relu_split`)
    branching: str = "babsr"  # its neuron choice: "babsr" or "fsb"
    device: str | None = None  # where bounds and searches run; None: the model's (an ONNX file's: cpu)


class _Checker:
    """Re-evaluates candidates on the original model (onnxruntime for ONNX files). Counterexamples are
    checked and returned on the CPU, whatever device the search runs on."""

    def __init__(self, onnx_source: Path | bytes | None, graph: Graph, input_shape: tuple[int, ...]) -> None:
        self.input_shape = input_shape
        self.graph = graph
        self.session = None
        if onnx_source is not None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only (not the warnings some exporters' models raise)
            source = onnx_source if isinstance(onnx_source, bytes) else str(onnx_source)
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (flattened, float64, on the CPU) of the original model at one input ``x`` (any shape,
        n entries)."""
        x = x.reshape(1, *self.input_shape[1:]).to(torch.float32)
        if self.session is not None:
            feed = x.cpu().numpy()
            return torch.from_numpy(self.session.run(None, {self.input_name: feed})[0]).reshape(-1).double()
        with torch.no_grad():
            value = evaluate(self.graph, (x.to(module_device(self.graph) or x.device),))[self.graph.output]
        return value.reshape(-1).double().cpu()

    def confirm(self, x: torch.Tensor, region: Region) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x, y)`` when the model's outputs ``y`` at ``x`` (clipped into the box, float64) satisfy some
        disjunct exactly. The model runs on ``x`` cast to float32, as VNN-COMP's checker runs it; ``x``
        itself stays in the box exactly (a float32 value may not: a pinned input ``0.1 <= X_0 <= 0.1``)."""
        x64 = torch.minimum(torch.maximum(x.reshape(-1).to("cpu", torch.float64), region.lower), region.upper)
        y = self.outputs(x64.to(torch.float32))
        for d in region.disjuncts:
            if bool((d.A @ y <= d.b).all()):
                return x64, y.to(torch.float32)
        return None


class Network:
    """A model ready for verification: the graph (float64 copy for bounds), its ReLU chain if it is
    one, and the checker of counterexamples. Build once per model and reuse (``boundprop bench``
    keeps one per ONNX file).

    ``device``: where bounds, searches and attacks run (see :func:`resolve_device`); by default the
    device of a module's parameters, the CPU for an ONNX file. The checker runs the original model
    where it is (onnxruntime on the CPU for ONNX) and returns counterexamples on the CPU."""

    def __init__(self, graph: Graph, input_shape: tuple[int, ...], onnx_source: Path | bytes | None = None,
                 float64: bool = True, device: str | torch.device | None = None) -> None:
        self.graph = graph
        self.input_shape = tuple(input_shape)
        self.n_inputs = int(math.prod(self.input_shape[1:]))
        self.dtype = torch.float64 if float64 else torch.float32
        #: where bounds, searches and attacks run (the checker runs the original model where it is)
        self.device = resolve_device(device, module_device(graph))
        self.bound_graph = graph.to(self.device, self.dtype)
        # a captured module's parameters are read live from it: bounds use float64 copies
        self.params: dict[str, Any] | None = None
        if graph.module is not None:
            self.params = {name: v.detach().to(self.device, self.dtype) if torch.is_tensor(v) and v.is_floating_point()
                           else v.to(self.device) if torch.is_tensor(v) else v
                           for name, v in graph.param_values().items()}
        self.checker = _Checker(onnx_source, graph, self.input_shape)
        self._chains: dict[int, ReluChain | None] = {}  # extracted chains by their max_entries

    @classmethod
    def from_onnx(cls, path: str | Path, float64: bool = True, device: str | torch.device | None = None) -> Network:
        """Import an ``.onnx`` (or gzipped ``.onnx.gz``) file."""
        from .. import load_onnx

        path = Path(path)
        source: Path | bytes = path
        if path.suffix == ".gz":
            import gzip

            import onnx

            with gzip.open(path, "rb") as fh:
                source = fh.read()
            graph = load_onnx(onnx.load_model_from_string(source))
        else:
            graph = load_onnx(path)
        return cls(graph, tuple(graph.input_shapes[0]), source, float64, device)

    @property
    def chain(self) -> ReluChain | None:
        """:meth:`relu_chain` with the default size limit."""
        return self.relu_chain()

    def relu_chain(self, max_entries: int = MAX_ENTRIES) -> ReluChain | None:
        """The network as a chain of dense affine maps and ReLUs, segments of at most ``max_entries``
        entries (None when it is not one or is too big); extracted once per limit. A chain found
        under a smaller limit serves a larger one, and None under a larger limit answers a smaller one."""
        for limit, chain in self._chains.items():
            if (chain is not None and limit <= max_entries) or (chain is None and limit >= max_entries):
                return chain
        chain = extract_relu_chain(self.graph, self.input_shape, max_entries=max_entries)
        if chain is not None:
            chain = chain.to(self.device)
        self._chains[max_entries] = chain
        return chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(n, n_out)`` at flattened inputs ``(n, n_in)`` in the bound dtype, on the network's device."""
        x = x.to(self.device, self.dtype)
        chain = next((c for c in self._chains.values() if c is not None), None)
        if chain is not None and self.dtype == torch.float64:  # extracted for branch and bound
            return chain.forward(x)
        x = x.reshape(-1, *self.input_shape[1:])
        return evaluate(self.bound_graph, (x,), self.params)[self.bound_graph.output].reshape(x.shape[0], -1)


def load_network(model: Any, input_shape: tuple[int, ...] | None = None, float64: bool = True,
                 device: str | torch.device | None = None) -> Network:
    """A :class:`Network` from an ONNX path, a captured :class:`Graph` or an ``nn.Module`` (give
    ``input_shape``, batch first, for a module). ``device``: where to verify (see
    :class:`Network`); a :class:`Network` given is used as it is."""
    from .. import capture

    if isinstance(model, Network):
        if device is not None and resolve_device(device) != model.device:
            raise ValueError(f"the Network was built for {model.device}, not {device}: build it with device=")
        return model
    if isinstance(model, (str, Path)):
        return Network.from_onnx(model, float64, device)
    if isinstance(model, Graph):
        return Network(model, tuple(input_shape or model.input_shapes[0]), None, float64, device)
    if input_shape is None:
        raise ValueError("verifying an nn.Module needs input_shape (batch dimension included)")
    graph = capture(model, (torch.zeros(input_shape, device=module_device(model) or "cpu"),))
    return Network(graph, tuple(input_shape), None, float64, device)


def verify(model: Any, spec: Property | str | Path, timeout: float = 60.0, *,
           input_shape: tuple[int, ...] | None = None, options: VerifierOptions | None = None,
           log: Callable[[str], None] | None = None) -> VerificationResult:
    """Decide a VNN-LIB property for a model.

    Arguments:
        model: a path to an ``.onnx`` file, a :class:`Network`, a captured :class:`Graph`, or an
            ``nn.Module`` (then give ``input_shape``, batch first).
        spec: a :class:`Property` or a path to a ``.vnnlib`` file.
        timeout: seconds (loading included); the verdict is ``timeout`` when the search is not
            finished by then.
        options: :class:`VerifierOptions`.
        log: called with progress messages.
    Returns:
        a :class:`VerificationResult`: ``sat`` with a counterexample ``(x, y)`` checked on the
        model, ``unsat``, ``timeout`` or ``unknown``.
    """
    start = time.perf_counter()
    deadline = start + timeout
    opts = options or VerifierOptions()
    prop = read_vnnlib(spec) if isinstance(spec, (str, Path)) else spec
    net = load_network(model, input_shape, opts.float64, opts.device)
    if net.n_inputs != prop.n_inputs:
        raise ValueError(f"the property has {prop.n_inputs} inputs but the model takes {net.n_inputs}")
    torch.manual_seed(opts.seed)
    stats: dict[str, Any] = {"regions": len(prop.regions), "attack_s": 0.0}
    with torch.no_grad():
        verdict, cex = decide_regions(prop, lambda region: _verify_region(net, region, deadline, opts, stats, log))
    return VerificationResult(verdict, cex, time.perf_counter() - start, stats)


def decide_regions(prop: Property, decide: Callable[[Region], tuple[str, Any]]) -> tuple[str, Any]:
    """The property's verdict from ``decide(region) -> (verdict, counterexample)`` over its regions:
    ``sat`` at the first counterexample, ``timeout`` at the first timeout, ``unsat`` when every
    region is refuted (a region without disjuncts is), else the last other verdict (``unknown``)."""
    verdict = "unsat"
    for region in prop.regions:
        if not region.disjuncts:
            continue
        outcome, cex = decide(region)
        if outcome in ("sat", "timeout"):
            return outcome, cex if outcome == "sat" else None
        if outcome != "unsat":
            verdict = outcome
    return verdict, None


def _spec_rows(region: Region, dtype: torch.dtype, device: torch.device):
    A = torch.cat([d.A for d in region.disjuncts]).to(device, dtype)
    b = torch.cat([d.b for d in region.disjuncts]).to(device, dtype)
    groups = torch.cat([torch.full((len(d.b),), i, dtype=torch.long, device=device)
                        for i, d in enumerate(region.disjuncts)])
    return A, b, groups


def _merge(stats: dict, new: dict) -> None:
    for key, value in new.items():
        if key == "max_stack":
            stats[key] = max(stats.get(key, 0), value)
        else:
            stats[key] = stats.get(key, 0) + value


def _attack(net: Network, region: Region, A, b, groups, opts: VerifierOptions, stats: dict, lower=None, upper=None,
            deadline: float | None = None):
    t = time.perf_counter()
    n_groups = int(groups.max()) + 1
    lo = (region.lower if lower is None else lower).reshape(-1, net.n_inputs).to(net.device, net.dtype)
    hi = (region.upper if upper is None else upper).reshape(-1, net.n_inputs).to(net.device, net.dtype)
    x, v = pgd_attack(net.forward, lo, hi, lambda y: violation(y, A, b, groups, n_groups), opts.attack_steps,
                      opts.attack_restarts, deadline=deadline)
    stats["attack_s"] += time.perf_counter() - t
    for i in torch.argsort(v)[:8].tolist():
        if v[i] <= 1e-6:
            cex = net.checker.confirm(x[i], region)
            if cex is not None:
                return cex
    return None


def _verify_region(net: Network, region: Region, deadline: float, opts: VerifierOptions, stats: dict,
                   log) -> tuple[str, Any]:
    if any(d.A.shape[0] == 0 for d in region.disjuncts):  # a disjunct with no output condition
        cex = net.checker.confirm((region.lower + region.upper) / 2, region)
        return ("sat", cex) if cex is not None else ("unknown", None)
    A, b, groups = _spec_rows(region, net.dtype, net.device)
    cex = _attack(net, region, A, b, groups, opts, stats, deadline=deadline)
    if cex is not None:
        return "sat", cex
    lower = region.lower.to(net.device, net.dtype).reshape(1, -1)
    upper = region.upper.to(net.device, net.dtype).reshape(1, -1)
    free = region.upper > region.lower
    n_free = int(free.sum())
    free = free.to(net.device)
    split = n_free <= opts.max_input_split_dims
    if not split:
        if opts.relu_split:  # ReLU chains: branch and bound on ReLU splits (beta-CROWN)
            from .relu_split import relu_split_region

            decided = relu_split_region(net, region, A, b, groups, deadline, opts, stats, log, opts.root_method)
            if decided is not None:
                return decided
        return _root_bound(net, region, lower, upper, A, b, groups, opts, stats)
    limits = SearchLimits(deadline, opts.batch_size, opts.margin_abs, opts.margin_rel, opts.optimise_iterations,
                          split, deep_attack_restarts=_deep_restarts(net, opts))
    confirm = Confirmer(lambda x: net.checker.confirm(x, region))
    if opts.use_chain and net.dtype == torch.float64 and net.chain is not None:
        chain = net.chain
        if n_free < net.n_inputs:  # inputs the region pins down (e.g. a few perturbed pixels): fold them in
            chain = restrict_chain(chain, free, lower[0])
            confirm.free, confirm.fixed = free, lower[0]
            lower, upper = lower[:, free], upper[:, free]
        search = ChainSearch(chain, A, b, groups, limits, log)
    else:
        search = GraphSearch(net.bound_graph, net.input_shape, A, b, groups, limits, opts.method, log, net.params)
    outcome = search.run(lower, upper, confirm)
    _merge(stats, outcome.stats)
    if outcome.status == "sat":
        return "sat", confirm.found[0]
    return outcome.status, None


def _deep_restarts(net: Network, opts: VerifierOptions) -> int:
    """Restarts of the wide attack: ``deep_attack_macs`` multiply-adds over the network's size."""
    if net.chain is None:
        return opts.attack_restarts
    macs = sum(w.numel() for w in net.chain.weights)
    return int(min(opts.deep_attack_max_restarts, max(opts.attack_restarts, opts.deep_attack_macs // max(1, macs))))


def _root_bound(net: Network, region: Region, lower, upper, A, b, groups, opts: VerifierOptions,
                stats: dict) -> tuple[str, Any]:
    """A region too wide to split: one bound of it with ``root_method`` (CROWN if that method fails),
    ``unsat`` if it refutes every disjunct; else the corners minimising the rows' linear bounds are
    tried as counterexamples, and the answer is ``unknown``."""
    from .. import PerturbationLpNorm, compute_bounds

    graph, shape = net.bound_graph, net.input_shape
    lo, hi = lower.reshape(1, *shape[1:]), upper.reshape(1, *shape[1:])
    margin = opts.margin_abs + opts.margin_rel * b.abs()
    n_groups = int(groups.max()) + 1
    t = time.perf_counter()
    res = None
    for method in dict.fromkeys((opts.root_method, "CROWN")):
        try:
            res = compute_bounds(graph, ((lo + hi) / 2,), {graph.inputs[0]: PerturbationLpNorm(x_L=lo, x_U=hi)},
                                 method=method, C=A.unsqueeze(0), upper=False, need_A=[graph.inputs[0]],
                                 params=net.params)
            break
        except (NotImplementedError, RuntimeError, ValueError):
            continue
    stats["root_bound_s"] = stats.get("root_bound_s", 0.0) + time.perf_counter() - t
    if res is None:
        return "unknown", None
    if bool(refuted_groups(res.lower - b, margin, groups, n_groups).all()):
        return "unsat", None
    lA = res.A[graph.inputs[0]]["lA"].reshape(1, A.shape[0], -1)
    corners = torch.where(lA > 0, lower.unsqueeze(1), upper.unsqueeze(1)).reshape(-1, lower.shape[1])
    points = torch.cat([(lower + upper) / 2, corners])
    with torch.no_grad():
        v = violation(net.forward(points), A, b, groups, n_groups)
    for i in torch.argsort(v)[:4].tolist():
        if v[i] <= 1e-6:
            cex = net.checker.confirm(points[i], region)
            if cex is not None:
                return "sat", cex
    return "unknown", None
