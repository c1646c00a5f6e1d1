"""Weight perturbation by name: map a model's parameter names to the graph's parameter leaves.

The native API perturbs any leaf of a captured graph, inputs and parameters alike::

    g = boundprop.capture(model, x)
    ptbs = boundprop.perturb_parameters(g, {"0.weight": PerturbationLpNorm(0.01), "*.bias": 0.01})
    ptbs[g.inputs[0]] = PerturbationLpNorm(0.1)         # optionally the input as well
    boundprop.compute_bounds(g, (x,), ptbs, method="CROWN")

A parameter's perturbation set has the parameter's own shape (no batch dimension); its linear
coefficients in a backward walk are ``(batch, spec, *param.shape)``. (The auto_LiRPA way, a
:class:`~boundprop.compat.BoundedParameter` in the model, works too.)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

import torch

from .lp import Perturbation, PerturbationLpNorm


def parameter_leaves(graph) -> dict[str, str]:
    """``{qualified parameter name: leaf name}`` for the graph's parameters (and an ONNX model's
    initializers, which are constants); buffers such as running statistics are left out."""
    return {src.qualname: name for name, src in graph.params.items() if src.kind in ("parameter", "constant")}


def perturb_parameters(graph, perturbations: Mapping[str, Perturbation | float], *, relative: bool = False,
                       norm: float = math.inf) -> dict[str, Perturbation]:
    """Perturbations keyed by leaf name, for :func:`boundprop.compute_bounds`.

    Arguments:
        graph: a captured graph (its parameters are read live from the model).
        perturbations: qualified parameter name (``"fc.weight"``, as in ``model.named_parameters()``)
            or a shell pattern (``"*.weight"``, ``"*"``) -> a :class:`Perturbation`, or a number
            ``eps`` meaning an ``norm``-ball of radius ``eps`` (``relative``: L-inf radius
            ``eps * |w|`` entry by entry, i.e. every weight may change by a fraction ``eps`` of
            itself). Every name or pattern must match at least one parameter; a parameter matched
            by several keys takes the first.
        relative, norm: how numbers are turned into perturbations (see above).

    Returns ``{leaf name: Perturbation}``. The radius of a relative perturbation is computed from
    the parameter's current value (keep the gradient: certified training may differentiate it).
    """
    leaves = parameter_leaves(graph)
    if relative and norm != math.inf:
        raise ValueError("relative radii are element-wise: use norm=inf")
    out: dict[str, Perturbation] = {}
    values = graph.param_values()
    for key, ptb in perturbations.items():
        names = [q for q in leaves if fnmatch.fnmatchcase(q, key)] if any(c in key for c in "*?[") else (
            [key] if key in leaves else [])
        if not names:
            raise KeyError(f"no parameter matches {key!r}; parameters: {', '.join(leaves) or 'none'}")
        for qualname in names:
            leaf = leaves[qualname]
            if leaf in out:
                continue
            if isinstance(ptb, Perturbation):
                out[leaf] = ptb
            else:
                eps = float(ptb)
                radius = eps * values[leaf].abs() if relative else eps
                out[leaf] = PerturbationLpNorm(radius, norm)
    return out


def sample_parameters(graph, perturbations: Mapping[str, Perturbation], generator: torch.Generator | None = None,
                      corners: bool = False) -> dict[str, torch.Tensor]:
    """A random point of each perturbed parameter's box (``corners``: a random vertex), by qualified name.

    For checking bounds empirically: ``torch.func.functional_call(model, {**params, **sample}, x)``.
    Only box (L-inf) perturbations are sampled exactly; other sets are sampled in their box.
    """
    names = {leaf: src.qualname for leaf, src in graph.params.items()}
    values = graph.param_values()
    out = {}
    for leaf, ptb in perturbations.items():
        if leaf not in names:
            continue
        value = values[leaf].detach()
        box = ptb.interval(value)
        u = torch.rand(value.shape, generator=generator, dtype=value.dtype).to(value.device)
        if corners:
            u = u.round()
        out[names[leaf]] = box.lower.detach() + u * (box.upper - box.lower).detach()
    return out
