"""CROWN with automatic intermediate bounds.

Before the final backward walk, every node whose relaxation needs its input's interval gets that
interval as tight as CROWN can make it, in topological order (so each walk sees final bounds of
everything before it):

* IBP decides which neurons are already stable: before a node is refined, its IBP interval is
  recomputed from the refined intervals before it (as auto_LiRPA's reference bounds), and only
  the neurons a consumer reports as unstable under it (``unstable(l, u)``, e.g. ``l < 0 < u``
  for ReLU) get a backward walk, with a one-hot specification per unstable neuron, in chunks of
  bounded memory (see :func:`coefficient_budget`);
* a walk from a 2-D feature map starts in patch form (:mod:`boundprop.domains.patches`;
  ``opts["conv_mode"] = "matrix"`` keeps dense one-hot specs);
* nodes that are element-wise functions or pure data movement of already refined nodes take
  their interval from their IBP rule instead (as tight, and free), and so do linear layers,
  convolutions and batch norms applied directly to an L-inf/box-perturbed input (IBP is exact
  there: ``W c +- |W| r`` is what CROWN would find);
* the new bounds are intersected with the IBP ones (never looser).

For a batch, the spec rows are the union over the examples of their unstable neurons, bounded for
every example (as auto_LiRPA does: a neuron stable in one example then still gets its CROWN
interval there, which tightens the IBP screening of the layers after it).

Gradients: by default the intermediate walks are differentiable (certified training with CROWN
needs that; under ``torch.no_grad()`` nothing is recorded). ``opts["intermediate_grad"] = False``
runs them without recording (they then enter the final bound as constants): much less memory when
gradients are enabled, e.g. for model parameters with ``requires_grad``, but gradients no longer
account for the intermediate bounds' dependence on the parameters. alpha-CROWN's walks (with
``alpha_for``) always record.

Cost: one backward walk per layer that feeds a nonlinearity, with as many spec rows as it has
unstable neurons: O(L^2) walks' worth of layer products for an L-layer network in the worst case;
in patch form each walk costs per row only the receptive field of the neuron, not the image.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..domains import Interval
from ..domains.patches import Patches
from ..graph import ops
from ..perturbation import PerturbationLpNorm
from ..rules.shape import MOVEMENT_OPS
from ..syncs import to_device, to_host
from .backward import AlphaLookup, ancestors, backward
from .ibp import interval_of
from .state import PropagationState

#: ``alpha_for_start(start_name, rows) -> AlphaLookup | None``: alpha-CROWN's parameters for the walk
#: from ``start_name``'s neurons ``rows`` (:func:`unstable_rows`).
AlphaForStart = Callable[[str, torch.Tensor], AlphaLookup | None]

_MOVEMENT = set(MOVEMENT_OPS)


aten = torch.ops.aten

#: pure reshapes (a box stays the same box)
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
             aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
             aten.unsqueeze.default, aten.clone.default, aten.alias.default, aten.contiguous.default}

#: ops whose IBP rule is exact (centre/radius with ``|W|``) when their input is a box
_EXACT_ON_BOX = {aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.convolution.default,
                 aten.conv_transpose1d.default, aten.conv_transpose2d.input, ops.batch_norm_eval}


def _cheap(state: PropagationState, name: str) -> bool:
    node = state.graph.node(name)
    entry = state.rules(node)
    return entry.relaxation is not None or node.target in _MOVEMENT


def _ibp_exact(state: PropagationState, name: str) -> bool:
    """An affine layer of one box-perturbed input: its IBP interval is already what CROWN would give."""
    node = state.graph.node(name)
    if node.target not in _EXACT_ON_BOX or not state.is_affine_here(node):
        return False
    while True:  # the one perturbed input, through pure data movement (e.g. a flatten), to the leaf
        perturbed = [p for p in node.inputs if p in state.perturbed]
        if len(perturbed) != 1:
            return False
        if perturbed[0] in state.perturbations:
            break
        node = state.graph.node(perturbed[0])
        if node.target not in _RESHAPES:
            return False
    ptb = state.perturbations[perturbed[0]]
    return isinstance(ptb, PerturbationLpNorm) and (ptb.norm == float("inf") or ptb._box_only())


def refresh_ibp(state: PropagationState, name: str) -> None:
    """Recompute (and intersect) the IBP interval of ``name`` and of every not yet refined node
    before it, from the refined intervals: the reference that decides which neurons CROWN bounds.

    A node is recomputed only if one of its inputs' intervals is another object than at its last
    recomputation (IBP is a function of them: the same inputs give the same interval). Before, any
    refinement anywhere recomputed every such node; on the zoo's transformer that was a layer
    norm's IBP (a 40-step search per row) once per intermediate walk.
    """
    seen = state.cache.setdefault("ibp_inputs", {})
    before = ancestors(state, name)
    for node in state.graph.nodes:
        n = node.name
        if n not in before or n not in state.perturbed or n in state.refined:
            continue
        inputs = tuple(state.intervals.get(i) for i in node.inputs)
        last = seen.get(n)
        if last is not None and all(a is b for a, b in zip(last, inputs)):
            continue
        state.intervals[n] = interval_of(state, n).intersect(state.intervals[n])
        seen[n] = inputs  # held, so that no identity test meets a reused id


def unstable_mask(state: PropagationState, name: str) -> torch.Tensor:
    """Neurons of ``name`` whose interval matters to some consumer that relaxes it."""
    bounds = state.intervals[name]
    mask = torch.zeros_like(bounds.lower, dtype=torch.bool)
    contributed = False
    for user in state.graph.users(name):
        node = state.graph.node(user)
        if user not in state.perturbed or not state.needs_input_bounds(node):
            continue
        entry = state.rules(node)
        if entry.unstable is None or node.inputs[0] != name:
            return torch.ones_like(mask)
        mask |= entry.unstable(bounds.lower, bounds.upper)
        contributed = True
    # refined only for a cheap successor's sake (e.g. a view feeding a ReLU): bound every neuron
    return mask if contributed else torch.ones_like(mask)


#: Coefficient tensors are kept below this many bytes when there is a choice: the allocator hands
#: larger blocks back to the OS on release (glibc: above its 32 MiB mmap ceiling), and faulting
#: fresh pages in again costs several times the arithmetic done on them.
FAST_BYTES = 2**24
#: The same for walks in patch form, which are dominated by element-wise passes over the windows:
#: chunks whose tensors stay in the CPU's caches between consecutive passes are faster (measured
#: about 25% faster than FAST_BYTES on the peer ResNet).
FAST_PATCH_BYTES = 2**21


def coefficient_budget(state: PropagationState, dtype: torch.dtype = torch.float32, patches: bool = False) -> int:
    """Elements per coefficient tensor: the memory bound ``opts["max_coefficient_elements"]``
    (default 2**25), lowered to :data:`FAST_BYTES` (:data:`FAST_PATCH_BYTES` for patch form) worth."""
    budget = int(state.opts.get("max_coefficient_elements", 2**25))
    fast = FAST_PATCH_BYTES if patches else FAST_BYTES
    return max(1, min(budget, fast // dtype.itemsize))


def spec_chunk_size(state: PropagationState, start: str) -> int:
    """How many one-hot specs to walk back at once so that one dense coefficient tensor stays small."""
    budget = coefficient_budget(state, state.example(start).dtype)
    widest = 1
    for name in ancestors(state, start):
        value = state.example(name) if name in state.perturbed else None
        if torch.is_tensor(value):
            widest = max(widest, value[0].numel() if name in state.batched else value.numel())
    return max(1, budget // (state.batch_size * widest))


class _SpecRows:
    """The rows ``begin:begin+count`` of spec-dependent alphas (for one chunk of specs)."""

    def __init__(self, alpha_for: AlphaLookup, begin: int, count: int):
        self.alpha_for, self.begin, self.count = alpha_for, begin, count

    def __call__(self, node: str, direction: str) -> torch.Tensor | None:
        alpha = self.alpha_for(node, direction)
        return alpha if alpha is None or alpha.shape[1] == 1 else alpha[:, self.begin:self.begin + self.count]

    def windows(self, node: str, direction: str, P, begin: int = 0) -> torch.Tensor | None:
        inner = getattr(self.alpha_for, "windows", None)
        return None if inner is None else inner(node, direction, P, self.begin + begin)


def _patch_form(state: PropagationState, name: str) -> bool:
    """Walks from this node start in patch form (a 2-D feature map, unless ``conv_mode="matrix"``)."""
    return (state.example(name).dim() == 4 and name in state.batched
            and state.opts.get("conv_mode", "patches") == "patches")


def unstable_rows(state: PropagationState, name: str) -> torch.Tensor:
    """Flat indices, on the host, of the neurons of ``name`` unstable in some example
    (:func:`unstable_mask`): the rows of its CROWN walk, as in auto_LiRPA. A data-dependent shape:
    one host read (of the mask) on any device."""
    return to_host(unstable_mask(state, name).reshape(state.batch_size, -1).any(0)).nonzero().flatten()


#: ``state.cache`` key of the rows an optimisation keeps for the walks of its later evaluations
#: (a dict ``{start: rows}`` that its evaluations share; see :func:`walk_rows`)
KEPT_ROWS = ("kept_rows",)


def walk_rows(state: PropagationState, name: str) -> torch.Tensor:
    """The rows of the CROWN walk from ``name``: :func:`unstable_rows`, or the rows an earlier
    evaluation of the same optimisation chose, where it keeps them (``state.cache[KEPT_ROWS]``).

    Any set of rows is sound: the neurons left out keep their interval. Intervals only shrink from
    one evaluation to the next, so the kept rows hold every neuron unstable now (for ``unstable``
    rules monotone in the interval, as alpha-CROWN requires); a neuron that has become stable is
    walked at a cost, and its interval can only tighten (the walk's bound is intersected with it).
    alpha-CROWN keeps the
    rows on accelerators, where reading the mask waits for the device once per start and evaluation;
    on CPU it reads it afresh (free there, and fewer rows are less work).
    """
    kept = state.cache.get(KEPT_ROWS)
    if kept is None:
        return unstable_rows(state, name)
    rows = kept.get(name)
    if rows is None:
        rows = kept[name] = unstable_rows(state, name)
    return rows


def _walk_start(state: PropagationState, name: str, part: torch.Tensor, dtype: torch.dtype,
                part_on_host: torch.Tensor):
    """One-hot specs for the neurons ``part`` of ``name``: Patches on a 2-D map, else a dense tensor.
    ``part_on_host``: the same indices on the CPU (for the Patches' row range, without a device read)."""
    shape = state.example(name).shape[1:]
    if _patch_form(state, name):
        return Patches.identity(part, tuple(shape), dtype, part_on_host)
    n = shape.numel()
    C = torch.zeros(1, part.numel(), n, dtype=dtype, device=part.device)
    C[0, torch.arange(part.numel(), device=part.device), part] = 1.0
    return C.reshape(1, part.numel(), *shape)


def crown_interval(state: PropagationState, name: str, rows: torch.Tensor | None = None,
                   alpha_for: AlphaLookup | None = None) -> Interval:
    """CROWN bounds of the neurons ``rows`` (flat indices on the host, :func:`unstable_rows`; None:
    all) of ``name``; the others keep their interval."""
    old = state.intervals[name]
    batch = state.batch_size
    flat_l, flat_u = old.lower.reshape(batch, -1), old.upper.reshape(batch, -1)
    n = flat_l.shape[1]
    index = torch.arange(n, device="cpu") if rows is None else rows  # on the host, as rows are
    if index.numel() == 0:
        return old
    new_l, new_u = flat_l.clone(), flat_u.clone()
    value = old.lower
    if alpha_for is None and value.dim() == 4:
        # position-major order (rows of one pixel together): a chunk of rows then covers a compact
        # band of the map, and patch-form walks gather windows from that band only
        C, pixels = value.shape[1], value.shape[2] * value.shape[3]
        index = index[torch.argsort((index % pixels) * C + index // pixels)]
    on_host, index = index, to_device(index, flat_l.device)
    chunk = spec_chunk_size(state, name)
    budget = coefficient_budget(state, flat_l.dtype, _patch_form(state, name))
    record = alpha_for is not None or state.opts.get("intermediate_grad", True)
    start = 0
    while start < index.numel():
        part = index[start:start + chunk]
        lookup = alpha_for
        if alpha_for is not None and part.numel() < index.numel():
            lookup = _SpecRows(alpha_for, start, part.numel())
        with nullcontext() if record else torch.no_grad():
            spec = _walk_start(state, name, part, flat_l.dtype, on_host[start:start + chunk])
            res = backward(state, name, spec, alpha_for=lookup)
        lo, hi = torch.maximum(flat_l[:, part], res.lower), torch.minimum(flat_u[:, part], res.upper)
        if alpha_for is not None:
            # alpha-CROWN: the gradient reaches the new bounds even where the old ones are tighter
            # (as auto_LiRPA's reference bounds), so that optimisation can start from a tie
            lo = res.lower + (lo - res.lower).detach()
            hi = res.upper + (hi - res.upper).detach()
        new_l[:, part], new_u[:, part] = lo, hi
        start += part.numel()
        # later chunks sized by what this walk really held (patches need far less than dense specs)
        chunk = max(1, budget // max(1, res.row_elements))
    return Interval(new_l.reshape(old.lower.shape), new_u.reshape(old.upper.shape))


def refine(state: PropagationState, name: str, alpha_for_start: AlphaForStart | None = None) -> None:
    """Make the interval of ``name`` final for this call."""
    stack = [name]
    while stack:
        current = stack[-1]
        if current in state.refined or current not in state.perturbed:
            stack.pop()
            continue
        if _cheap(state, current):
            pending = [p for p in state.graph.node(current).inputs
                       if p in state.perturbed and p not in state.refined]
            if pending:
                stack.extend(pending)
                continue
            state.intervals[current] = interval_of(state, current).intersect(state.intervals[current])
        elif not _ibp_exact(state, current):
            refresh_ibp(state, current)
            rows = walk_rows(state, current)
            alpha_for = alpha_for_start(current, rows) if alpha_for_start else None
            state.intervals[current] = crown_interval(state, current, rows, alpha_for)
        state.refined.add(current)
        stack.pop()


def refine_intermediate(state: PropagationState, target: str, alpha_for_start: AlphaForStart | None = None) -> None:
    """Refine, in topological order, every interval the final walk from ``target`` will read."""
    needed = state.ancestors(target)
    for node in state.graph.nodes:
        if node.name not in needed or node.name not in state.perturbed:
            continue
        if state.needs_input_bounds(node):
            for parent in node.inputs:
                if parent in state.perturbed:
                    refine(state, parent, alpha_for_start)
