"""Branch and bound of one property spread over Ray actors (``boundprop verify --ray``).

Built only on the verifier's public API (:func:`boundprop.verify` on a :class:`Property`), so it
needs no hook in the search itself:

1. each input region of the property is cut into ``parts`` sub-boxes by halving the free input
   dimensions that are widest relative to the region (a sub-box with the region's disjuncts is a
   property of its own: the region is refuted exactly when every sub-box is);
2. ``workers`` actors (one process each, the network imported once per actor) take sub-boxes from a
   shared queue as they become free and run the whole verifier on them (attack, bounds, input-split
   branch and bound) for a time slice;
3. a sub-box answered ``unsat`` is done; one that uses up its slice is halved again and both halves
   go back on the queue with twice the slice (so at most about half of the work is ever redone,
   and the queue balances the load: hard corners of the region end up spread over all actors);
4. early stop, shared by all actors: the first confirmed counterexample (``sat``; checked on the
   model inside the actor, and the sub-box lies in the region) ends the search, and the actors still
   working are killed at once; past the global deadline the answer is ``timeout``. A sub-box answered
   ``unknown`` makes the region ``unknown`` unless another sub-box is ``sat``. An actor that dies is
   dropped and its sub-box goes to another actor, once (twice lost: ``unknown``).

What is shared is the verdict state (done / counterexample found / deadline), not a best bound: in
input-split verification every sub-box must be refuted on its own, so there is no global bound to
prune with. When it pays: instances that take a single process well over the start-up of the
actors (a few seconds each) and the attack each sub-box begins with; easy instances are faster in
one process, and a benchmark of many instances is better spread per instance
(``boundprop bench --ray``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import RayConfig, is_system_failure, start_ray, stop_ray


class BabWorker:
    """An actor's state: the network (built once) and the verifier options."""

    def __init__(self, source: Any, options: Any, threads: int, deep_attacks: bool = False) -> None:
        import dataclasses

        from ..bab.verifier import VerifierOptions

        torch.set_num_threads(max(1, threads))
        self.net = source.network()
        self.options = options or VerifierOptions()
        if not deep_attacks and hasattr(self.options, "deep_attack_max_restarts"):
            # the wide attacks a long search runs on its whole box (at 2, 6, 14... s) would be repeated
            # on every sub-box, by every actor: sub-boxes rely on the first attack and the in-box ones
            self.options = dataclasses.replace(self.options, deep_attack_max_restarts=0)

    def solve(self, lower: torch.Tensor, upper: torch.Tensor, disjuncts: list, n_outputs: int,
              timeout: float) -> tuple[str, Any, dict, float]:
        """``verify`` on the sub-box ``[lower, upper]``: ``(verdict, counterexample, stats, seconds)``."""
        from ..bab.verifier import verify
        from ..spec.vnnlib import Property, Region

        t = time.perf_counter()
        prop = Property(lower.numel(), n_outputs, [Region(lower, upper, disjuncts)], "sub-box")
        res = verify(self.net, prop, timeout=max(0.0, timeout), options=self.options)
        return res.verdict, res.counterexample, res.stats, time.perf_counter() - t


def split_box(lower: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, parts: int) -> list[tuple]:
    """At least ``parts`` boxes covering ``[lower, upper]`` (1-D): repeatedly halve every box along its
    free dimension widest relative to ``scale`` (the region's widths; lowest index on ties)."""
    boxes = [(lower.clone(), upper.clone())]
    while len(boxes) < parts:
        out = []
        for lo, hi in boxes:
            rel = torch.where(scale > 0, (hi - lo) / scale.clamp_min(1e-300), torch.zeros_like(lo))
            if float(rel.max()) <= 0:
                return boxes  # no free dimension: cannot split
            out += halve(lo, hi, int(rel.argmax()))
        boxes = out
    return boxes


def halve(lo: torch.Tensor, hi: torch.Tensor, dim: int) -> list[tuple]:
    mid = (lo[dim] + hi[dim]) / 2
    left_hi, right_lo = hi.clone(), lo.clone()
    left_hi[dim] = mid
    right_lo[dim] = mid
    return [(lo, left_hi), (right_lo, hi)]


def _merge(stats: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, (int, float)) and key != "regions":
            stats[key] = max(stats.get(key, 0), value) if key == "max_stack" else stats.get(key, 0) + value


class BabPool:
    """Ray actors holding one network, reusable for several properties of that network.

    ``model``: a path to an ``.onnx`` (or ``.onnx.gz``) file, or an ``nn.Module`` with ``input_shape``
    (batch first). ``deep_attacks``: let every sub-box search run the verifier's wide attacks on its
    box once it lasts (off by default: repeated on every sub-box, they cost more than they find).
    Use as a context manager, or call :meth:`close` (it kills the actors, and ends the Ray session
    when the pool started it)."""

    def __init__(self, model: Any, input_shape: tuple[int, ...] | None = None, config: RayConfig | None = None,
                 options: Any = None, deep_attacks: bool = False) -> None:
        from ..certify import ModelSource

        if isinstance(model, (str, Path)):
            source = ModelSource((1,), onnx=Path(model).read_bytes(), name=str(model))
        else:
            if input_shape is None:
                raise ValueError("verifying an nn.Module needs input_shape (batch dimension included)")
            source = ModelSource(tuple(input_shape), module=model, name=type(model).__name__)
        self.config = config or RayConfig()
        self.ray, self._started = start_ray(self.config)
        self.actors: list = []
        try:
            n = self.config.slots(self.ray)
            opts = {k: v for k, v in self.config.task_options().items() if k != "max_retries"}
            actor_cls = self.ray.remote(BabWorker)
            threads = max(1, int(self.config.cpus_per_task))
            self.actors = [actor_cls.options(**opts).remote(source, options, threads, deep_attacks) for _ in range(n)]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BabPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        stop_ray(self.ray, self._started)

    def verify(self, spec: Any, timeout: float = 60.0, *, parts: int | None = None, slice_s: float | None = None,
               log: Callable[[str], None] | None = None) -> Any:
        """Decide ``spec`` (a :class:`~boundprop.spec.vnnlib.Property` or a ``.vnnlib`` path); see
        :func:`verify_distributed`. After an early stop the actors still busy are cancelled."""
        from ..bab.verifier import VerificationResult, decide_regions
        from ..spec.vnnlib import read_vnnlib

        start = time.perf_counter()
        deadline = start + timeout
        prop = read_vnnlib(spec) if isinstance(spec, (str, Path)) else spec
        stats: dict[str, Any] = {"regions": len(prop.regions), "parts": 0, "resplits": 0, "workers": len(self.actors)}
        first_slice = slice_s if slice_s is not None else max(1.0, timeout / 8)
        verdict, cex = decide_regions(prop, lambda region: _region(
            self.ray, self.actors, region, prop.n_outputs, parts or 2 * len(self.actors), first_slice, deadline,
            stats, log))
        return VerificationResult(verdict, cex, time.perf_counter() - start, stats)


def verify_distributed(model: Any, spec: Any, timeout: float = 60.0, *, input_shape: tuple[int, ...] | None = None,
                       config: RayConfig | None = None, parts: int | None = None, slice_s: float | None = None,
                       options: Any = None, log: Callable[[str], None] | None = None) -> Any:
    """Decide a property with its regions' sub-boxes spread over Ray actors (a :class:`BabPool` for
    this one call).

    Arguments:
        model: a path to an ``.onnx`` (or ``.onnx.gz``) file, or an ``nn.Module`` (give ``input_shape``).
        spec: a :class:`~boundprop.spec.vnnlib.Property` or a path to a ``.vnnlib`` file.
        timeout: seconds of the search (the actors' start-up comes on top).
        config: where to run and the resources of each actor (default: a local instance, all cores).
        parts: sub-boxes per region at the start (default: 2 per actor).
        slice_s: first time slice of a sub-box (default: ``timeout / 8``, at least 1 s).
        options: :class:`~boundprop.bab.verifier.VerifierOptions` of every actor's verifier.
    Returns:
        a :class:`~boundprop.bab.verifier.VerificationResult` (``stats`` adds ``parts`` (sub-boxes
        answered), ``resplits`` and ``workers``).
    """
    with BabPool(model, input_shape, config, options) as pool:
        return pool.verify(spec, timeout, parts=parts, slice_s=slice_s, log=log)


def _region(ray: Any, actors: list, region: Any, n_outputs: int, parts: int, first_slice: float, deadline: float,
            stats: dict, log) -> tuple[str, Any]:
    lower, upper = region.lower.double(), region.upper.double()
    queue = deque((lo, hi, first_slice) for lo, hi in split_box(lower, upper, upper - lower, parts))
    free = list(actors)
    running: dict[Any, tuple[Any, torch.Tensor, torch.Tensor, float]] = {}
    try:
        return _search(ray, actors, free, running, queue, region, n_outputs, lower, upper, deadline, stats, log)
    finally:
        for ref in running:  # early stop: the sub-boxes still being searched are cancelled
            ray.cancel(ref)


def _search(ray, actors, free, running, queue, region, n_outputs, lower, upper, deadline, stats,
            log) -> tuple[str, Any]:
    undecided = False
    retried: set[int] = set()  # ids of sub-boxes already resubmitted after an actor died
    while queue or running:
        now = time.perf_counter()
        if now >= deadline:
            return "timeout", None
        if not actors:  # every actor died
            return "unknown", None
        while queue and free:
            lo, hi, slice_s = queue.popleft()
            actor = free.pop()
            ref = actor.solve.remote(lo, hi, region.disjuncts, n_outputs, min(slice_s, deadline - now))
            running[ref] = (actor, lo, hi, slice_s)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.01, min(0.5, deadline - now)))
        for ref in ready:
            actor, lo, hi, slice_s = running.pop(ref)
            try:
                verdict, cex, sub_stats, _ = ray.get(ref)
            except Exception as err:
                if not is_system_failure(err):
                    raise
                actors.remove(actor)  # a dead actor is not used again; its sub-box goes to another, once
                stats["lost_workers"] = stats.get("lost_workers", 0) + 1
                if id(lo) in retried:
                    undecided = True
                else:
                    retried.add(id(lo))
                    queue.appendleft((lo, hi, slice_s))
                continue
            free.append(actor)
            stats["parts"] += 1
            _merge(stats, sub_stats)
            if verdict == "sat":
                return "sat", cex
            if verdict == "timeout":
                if time.perf_counter() >= deadline:
                    return "timeout", None
                rel = torch.where(upper > lower, (hi - lo) / (upper - lower).clamp_min(1e-300), torch.zeros_like(lo))
                if float(rel.max()) <= 0:
                    undecided = True
                    continue
                stats["resplits"] += 1
                for half in halve(lo, hi, int(rel.argmax())):
                    queue.append((*half, 2 * slice_s))
                if log is not None:
                    log(f"sub-box open after {slice_s:.1f} s: halved; {len(queue)} queued, {len(running)} running")
            elif verdict != "unsat":
                undecided = True
    return ("unknown" if undecided else "unsat"), None


__all__ = ["BabPool", "BabWorker", "split_box", "verify_distributed"]
