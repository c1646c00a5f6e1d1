"""auto_LiRPA-compatible names over boundprop's native API.

An auto_LiRPA script runs by changing its import line to ``from boundprop import ...``:
:class:`BoundedModule`, :class:`BoundedTensor`, :class:`BoundedParameter`,
``PerturbationLpNorm`` and ``compute_bounds`` keep auto_LiRPA 0.7's names, arguments and return
shapes. Underneath, a :class:`BoundedModule` is a captured :class:`~boundprop.graph.Graph` plus the
inputs and perturbations of the last call; every ``compute_bounds`` returns bounds computed by
:func:`boundprop.compute_bounds`, whose frozen result is kept only to answer later questions
(``save_intermediate``, ``net[node].lower``, ``reuse_ibp``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algorithms import BoundResult, canonical_method
from ..algorithms import compute_bounds as native_compute_bounds
from ..graph import Graph, evaluate
from ..perturbation import Perturbation

#: Bound options understood by boundprop. Keys that change the relaxation are honoured; keys that
#: only tune speed or memory in auto_LiRPA are accepted while boundprop picks its own strategy.
DEFAULT_BOUND_OPTS: dict[str, Any] = {
    "activation_bound_option": "adaptive",
    "optimize_bound_args": {
        "enable_alpha_crown": True, "enable_beta_crown": False, "iteration": 20, "optimizer": "adam",
        "lr_alpha": 0.5, "lr_beta": 0.05, "lr_decay": 0.98, "keep_best": True, "start_save_best": 0.5,
        "early_stop_patience": 10, "init_alpha": True, "fix_interm_bounds": True,
        "use_shared_alpha": False, "max_time": 1e9, "loss_reduction_func": None,
        "stop_criterion_func": None, "use_float64_in_last_iteration": False,
        "pruning_in_iteration": False, "pruning_in_iteration_threshold": 0.2, "deterministic": False,
        "lr_coeffs": 0.01, "intermediate_refinement_layers": [-1], "multi_spec_keep_func": None,
        "apply_output_constraints_to": [], "tighten_input_bounds": False,
        "best_of_oc_and_no_oc": False, "directly_optimize": [], "oc_lr": 0.1, "share_gammas": False,
        "lr_cut_beta": 5e-3,
    },
    "max_coefficient_elements": 2**25,
    "loss_fusion": False,
    "no_ibp_loss_fusion": False,
}

#: auto_LiRPA keys accepted for compatibility that do not change boundprop's bounds.
SPEED_ONLY_OPTS = {
    "conv_mode", "sparse_intermediate_bounds", "sparse_conv_intermediate_bounds",
    "sparse_intermediate_bounds_with_ibp", "sparse_features_alpha", "sparse_spec_alpha",
    "minimum_sparsity", "crown_batch_size", "max_crown_size", "batched_crown_max_vram_ratio",
    "forward_refinement", "forward_max_dim", "use_full_conv_alpha", "use_full_conv_alpha_thresh",
    "enable_opt_interm_bounds", "optimize_graph", "compare_crown_with_ibp",
    "forward_before_compute_bounds", "clip_in_alpha_crown", "bound_every_node", "verbosity",
    "deterministic", "disabled_optimization", "disable_optimization", "buffers", "param", "bn",
    "reshape", "matmul", "mul", "exp", "softmax", "hardtanh", "fixed_reducemax_index", "sigmoid",
    "tanh", "gelu", "sin", "cos", "atan", "pow", "relu_grad", "s_shaped_disable_smoothness_enhancement",
    "enable_beta_crown", "tanh_tol", "sigmoid_tol",
}
ACTIVATION_OPTIONS = {"adaptive", "same-slope", "zero-lb", "one-lb", "reversed-adaptive"}


def check_bound_opts(opts: Mapping[str, Any]) -> None:
    """Reject unknown keys and invalid relaxation choices with a message naming them."""
    unknown = [k for k in opts if k not in DEFAULT_BOUND_OPTS and k not in SPEED_ONLY_OPTS and k != "relu"]
    if unknown:
        raise ValueError(f"unknown bound_opts key(s): {', '.join(map(repr, unknown))}; known keys: "
                         f"{', '.join(sorted(set(DEFAULT_BOUND_OPTS) | SPEED_ONLY_OPTS))}")
    option = opts.get("activation_bound_option", "adaptive")
    if option not in ACTIVATION_OPTIONS:
        raise ValueError(f"activation_bound_option must be one of {sorted(ACTIVATION_OPTIONS)}, got {option!r}")
    inner = opts.get("optimize_bound_args", {})
    known_inner = DEFAULT_BOUND_OPTS["optimize_bound_args"]
    bad = [k for k in inner if k not in known_inner]
    if bad:
        raise ValueError(f"unknown optimize_bound_args key(s): {', '.join(map(repr, bad))}")


def _merge(base: dict, update: Mapping) -> dict:
    out = copy.copy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class BoundedTensor(torch.Tensor):
    """A tensor carrying a perturbation ``ptb`` (auto_LiRPA's ``BoundedTensor(x, ptb)``).

    Torch operations on it return plain tensors.
    """

    ptb: Perturbation | None

    @staticmethod
    def __new__(cls, x: torch.Tensor, ptb: Perturbation | None = None, *args, **kwargs):
        # a tensor stays where it is (``as_tensor`` would move it to a default device)
        tensor = torch.Tensor._make_subclass(cls, x, x.requires_grad) if isinstance(
            x, torch.Tensor) else torch.Tensor._make_subclass(cls, torch.as_tensor(x), False)
        tensor.ptb = ptb
        return tensor

    def __init__(self, x: torch.Tensor, ptb: Perturbation | None = None, *args, **kwargs) -> None:
        self.ptb = ptb

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"<BoundedTensor: {torch.Tensor(self).__repr__()}, {self.ptb!r}>"

    def __deepcopy__(self, memo):
        return BoundedTensor(self.detach().clone(), copy.deepcopy(self.ptb, memo))


class BoundedParameter(nn.Parameter):
    """A parameter with a perturbation (auto_LiRPA's ``BoundedParameter(data, ptb)``)."""

    def __new__(cls, data: torch.Tensor, ptb: Perturbation | None = None, requires_grad: bool = True):
        param = nn.Parameter._make_subclass(cls, data, requires_grad)
        param.ptb = ptb
        return param

    def __init__(self, data: torch.Tensor, ptb: Perturbation | None = None, requires_grad: bool = True) -> None:
        self.ptb = ptb

    def __deepcopy__(self, memo):
        return BoundedParameter(self.data.clone(), copy.deepcopy(self.ptb, memo), self.requires_grad)

    def __reduce_ex__(self, proto):
        return (BoundedParameter, (self.data, self.ptb, self.requires_grad))


@dataclass(frozen=True)
class NodeView:
    """Read-only view of one node's bounds from the last call (``net[name].lower``)."""

    name: str
    lower: torch.Tensor | None
    upper: torch.Tensor | None
    perturbed: bool


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    if isinstance(x, (tuple, list)):
        return tuple(x)
    return (x,)


class BoundedModule(nn.Module):
    """auto_LiRPA's ``BoundedModule(model, global_input, bound_opts=None, device='auto', ...)``.

    Captures ``model`` once (``global_input``: an example input, or a tuple of them, with a batch
    dimension; any batch size works afterwards). Parameters stay the model's own (training the
    model or this module updates the same tensors); ``state_dict`` keys are the model's.
    """

    def __init__(self, model: nn.Module, global_input: Any, bound_opts: Mapping[str, Any] | None = None,
                 device: str | torch.device = "auto", verbose: bool = False,
                 custom_ops: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        from .. import capture

        opts = dict(bound_opts or {})
        if "relu" in opts and "activation_bound_option" not in opts:
            opts["activation_bound_option"] = opts.pop("relu")
        check_bound_opts(opts)
        self.bound_opts = _merge(DEFAULT_BOUND_OPTS, opts)
        if custom_ops:
            raise NotImplementedError("custom_ops: register boundprop rules with boundprop.rules.registry "
                                      "decorators (interval_rule, relaxation_rule, backward_rule) instead")
        self.model = model
        if device != "auto":
            self.model.to(device)
        self.verbose = verbose
        inputs = tuple(torch.Tensor(x) if isinstance(x, BoundedTensor) else x for x in _as_tuple(global_input))
        self.graph: Graph = capture(model, inputs)
        self._param_ptbs = self._find_bounded_parameters()
        self._last_inputs: tuple = ()
        self._last_ptbs: dict[str, Perturbation] = {}
        self._last_result: BoundResult | None = None
        self._last_ibp: BoundResult | None = None
        self.fused_bound = None  # the last loss-fusion bound (boundprop.training.fusion.FusedBound)

    # -- names ---------------------------------------------------------------------------------
    @property
    def input_name(self) -> list[str]:
        return list(self.graph.inputs)

    @property
    def output_name(self) -> list[str]:
        return [self.graph.output]

    @property
    def final_name(self) -> str:
        return self.graph.output

    @property
    def root_names(self) -> list[str]:
        return list(self.graph.leaves)

    @property
    def node_name_map(self) -> dict[str, str]:
        """Original parameter/buffer name -> leaf node name."""
        return {src.qualname: name for name, src in self.graph.params.items()}

    def _find_bounded_parameters(self) -> dict[str, Perturbation]:
        found = {}
        for name, src in self.graph.params.items():
            if src.kind == "parameter":
                value = self.model.get_parameter(src.qualname)
                if isinstance(value, BoundedParameter) and value.ptb is not None:
                    found[name] = value.ptb
        return found

    # -- options -------------------------------------------------------------------------------
    def set_bound_opts(self, new_opts: Mapping[str, Any]) -> None:
        """Merge ``new_opts`` into the bound options (nested dicts are merged, not replaced)."""
        check_bound_opts(new_opts)
        self.bound_opts = _merge(self.bound_opts, new_opts)

    # -- forward -------------------------------------------------------------------------------
    def _record_inputs(self, x: tuple) -> tuple[torch.Tensor, ...]:
        if len(x) != len(self.graph.inputs):
            raise ValueError(f"the model takes {len(self.graph.inputs)} input(s), got {len(x)}")
        ptbs: dict[str, Perturbation] = {}
        plain = []
        for name, value in zip(self.graph.inputs, x):
            if isinstance(value, BoundedTensor):
                if value.ptb is not None:
                    ptbs[name] = value.ptb
                value = torch.Tensor(value)
            # a tensor stays where it is (``as_tensor`` would move it to a default device)
            plain.append(value if isinstance(value, torch.Tensor) else torch.as_tensor(value))
        self._last_inputs = tuple(plain)
        self._last_ptbs = ptbs
        return self._last_inputs

    def forward(self, *x: Any, final_node_name: str | None = None, method_opt: str | None = None,
                **kwargs: Any) -> torch.Tensor:
        """The model's output on ``x`` (recording BoundedTensor perturbations for later calls)."""
        if method_opt is not None:
            return getattr(self, method_opt)(*x, **kwargs)
        if len(x) == 1 and isinstance(x[0], (tuple, list)) and len(self.graph.inputs) != 1:
            x = tuple(x[0])
        inputs = self._record_inputs(x)
        env = evaluate(self.graph, inputs, stop_at=final_node_name)
        return env[final_node_name or self.graph.output]

    # -- bounds --------------------------------------------------------------------------------
    def compute_bounds(self, x: Any = None, aux: Any = None, C: torch.Tensor | None = None,
                       method: str | None = "backward", IBP: bool = False, forward: bool = False,
                       bound_lower: bool = True, bound_upper: bool = True, reuse_ibp: bool = False,
                       reuse_alpha: bool = False, return_A: bool = False,
                       needed_A_dict: Mapping[str, Sequence[str]] | None = None,
                       final_node_name: str | None = None, average_A: bool = False,
                       interm_bounds: Mapping[str, Any] | None = None,
                       reference_bounds: Mapping[str, Any] | None = None, **unused: Any):
        """auto_LiRPA's ``compute_bounds``: returns ``(lb, ub)`` or ``(lb, ub, A_dict)``.

        ``lb``/``ub`` have shape ``(batch, spec)`` with ``C``, else the bounded node's shape. A
        side not asked for is None.
        """
        if x is not None:
            self._record_inputs(_as_tuple(x))
        if not self._last_inputs:
            raise ValueError("compute_bounds needs inputs: pass x=(BoundedTensor(...),) or call the module first")
        if IBP and method is None:
            method = "IBP"
        elif method is None:
            method = "backward"
        name = canonical_method(method)
        if forward and name == "crown":
            name = "forward+backward"
        if reuse_ibp and name == "ibp" and self._last_ibp is not None:
            res = self._last_ibp
            return res.lower, res.upper
        ptbs = dict(self._last_ptbs)
        ptbs.update(self._param_ptbs)
        need_A = set()
        if return_A:
            for ins in (needed_A_dict or {self.graph.output: list(self.graph.inputs)}).values():
                need_A.update(ins)
        interm = {}
        for source in (reference_bounds, interm_bounds):
            for key, value in (source or {}).items():
                interm[key] = (value[0], value[1])
        if not ptbs:
            out = self.forward(*self._last_inputs, final_node_name=final_node_name)
            if C is not None:
                out = (C.reshape(C.shape[0], C.shape[1], -1) @ out.reshape(out.shape[0], -1, 1)).squeeze(-1)
            result = (out if bound_lower else None, out if bound_upper else None)
            return (*result, {}) if return_A else result
        if self.bound_opts.get("loss_fusion") and bound_upper and C is None and not return_A and not interm \
                and final_node_name is None:
            fused = self._fused_bounds(name, ptbs, bound_lower)
            if fused is not None:
                return fused
        res = native_compute_bounds(self.graph, self._last_inputs, ptbs, name, C, lower=bound_lower,
                                    upper=bound_upper, opts=self.bound_opts, final_node=final_node_name,
                                    interm_bounds=interm or None, need_A=sorted(need_A))
        self._last_result = res
        if name == "ibp":
            self._last_ibp = res
        if not return_A:
            return res.lower, res.upper
        out_name = final_node_name or self.graph.output
        A_dict: dict[str, dict[str, dict[str, Any]]] = {}
        wanted = needed_A_dict or {out_name: list(self.graph.inputs)}
        for out_node, ins in wanted.items():
            A_dict[out_node] = {}
            for in_node in ins:
                entry = dict(res.A.get(in_node, {"lA": None, "uA": None, "lbias": None, "ubias": None}))
                if average_A:
                    entry = {k: (v.mean(0, keepdim=True) if torch.is_tensor(v) and k in ("lA", "uA") else v)
                             for k, v in entry.items()}
                entry["unstable_idx"] = None
                A_dict[out_node][in_node] = entry
        return res.lower, res.upper, A_dict

    def _fused_bounds(self, name: str, ptbs: dict, bound_lower: bool):
        """Loss fusion (``bound_opts["loss_fusion"]``) on a :class:`~boundprop.CrossEntropyWrapper` graph.

        Returns ``(lb, ub)`` with ``ub = exp(log_ub)`` (see :mod:`boundprop.training.fusion`; the stable
        ``log_ub`` and shift are kept in ``self.fused_bound``), or None where the fused path does not
        apply (the generic engine then bounds the same graph, soundly but without the shift).
        """
        from ..training.fusion import FUSED_METHODS, fused_bounds, match_loss_fusion

        pattern = match_loss_fusion(self.graph)
        if pattern is None or name not in FUSED_METHODS or any(k not in self.graph.inputs for k in ptbs):
            return None
        fused = fused_bounds(self.graph, self._last_inputs, ptbs, name, self.bound_opts, pattern)
        self.fused_bound = fused
        lb = None
        if bound_lower:
            lb = native_compute_bounds(self.graph, self._last_inputs, ptbs, name, None, lower=True, upper=False,
                                       opts=self.bound_opts).lower
        return lb, fused.ub

    # -- results of the last call --------------------------------------------------------------
    def __getitem__(self, name: str) -> NodeView:
        res = self._last_result
        interval = res.intervals.get(name) if res is not None else None
        if interval is None and name not in self.graph.all_names():
            raise KeyError(f"no node called {name!r}")
        return NodeView(name, interval.lower if interval else None, interval.upper if interval else None,
                        interval is not None)

    def save_intermediate(self, save_path: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{node: (lower, upper)}`` for every perturbed node bounded by the last call."""
        if self._last_result is None:
            raise RuntimeError("call compute_bounds first")
        out = {k: (v.lower.detach(), v.upper.detach()) for k, v in self._last_result.intervals.items()}
        if save_path is not None:
            torch.save(out, save_path)
        return out

    def nodes(self) -> list[str]:
        return self.graph.all_names()

    # -- parameters keep the model's names ---------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.model.named_parameters(prefix, recurse, remove_duplicate)

    def __repr__(self) -> str:
        return f"BoundedModule(\n{self.graph!r}\n)"
