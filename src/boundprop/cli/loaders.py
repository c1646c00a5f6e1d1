"""Resolve the command line's ``--model``, ``--arch`` and ``--input`` into modules and tensors.

Model sources (``--model``):

* nothing (or ``digits``): the bundled digits classifier (:mod:`boundprop.data`);
* ``module:factory`` or ``path/to/file.py:factory``: import the module and call ``factory()``
  (an ``nn.Module`` instance found there is used as is); dotted attributes are allowed;
* a ``.pt``/``.pth`` file: a whole pickled ``nn.Module``; a state dict with ``--arch`` naming its
  architecture (``module:factory`` or a bundled architecture name); or a bundle in the format of
  ``boundprop/data/digits.pt`` (``{"arch", "state_dict", ...}``);
* a ``.onnx`` file: handed to boundprop's ONNX importer (:data:`ONNX_IMPORTERS`) when it exists.

Inputs (``--input``): a ``.pt``/``.pth`` file holding a tensor, a pair ``(x, labels)`` or a dict
with ``x``/``inputs``/``images`` and optionally ``y``/``labels``/``targets``; a ``.npy`` array; a
``.npz`` archive with the same keys. The first dimension is the batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..graph import Graph


class CliError(Exception):
    """A user error: reported as one message and exit status 2, without a traceback."""


#: why the bounding commands default to one thread
THREADS_HELP = ("torch CPU threads (default 1: bounding runs many small operations, which extra threads "
                "slow down, 10-70x measured when the cores are shared with other work)")


def add_threads_argument(parser, default: int | None = 1, help: str = THREADS_HELP) -> None:
    """The ``--threads N`` option."""
    parser.add_argument("--threads", type=int, default=default, help=help)


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` after checking it (None: leave torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def add_device_argument(parser, what: str = "bounds and searches") -> None:
    """The ``--device D`` option: ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    parser.add_argument("--device", default="cpu", metavar="D",
                        help=f"where {what} run: cpu, cuda, cuda:N, or auto (CUDA when available); default: cpu")


def device_from_args(value: str, ray_config: Any = None) -> torch.device:
    """The checked device of ``--device`` (a one-line error when it is unknown, not on this machine, or
    not the CPU with ``--ray``, whose workers verify on the CPU)."""
    from ..devices import resolve_device

    try:
        device = resolve_device(value)
    except RuntimeError as err:
        raise CliError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {value}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if ray_config is not None and device.type != "cpu":
        raise CliError("--device with --ray: Ray workers verify on the CPU only")
    return device


def ray_config_from_args(args) -> Any:
    """The checked :class:`~boundprop.distributed.RayConfig` of ``--ray`` (None without it); bad
    settings or a missing Ray install are a one-line error, raised before any work starts."""
    if getattr(args, "ray", None) is None:
        return None
    from ..distributed import RayConfig, RayUnavailable, require_ray

    config = RayConfig.from_args(args)
    try:
        config.validate()
        require_ray()
    except (ValueError, RayUnavailable) as err:
        raise CliError(str(err)) from None
    return config


def read_result_rows(path: Path, header: list[str], what: str) -> list[list[str]]:
    """The rows of an existing results CSV (``--output``, to resume), after checking its header."""
    import csv

    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        found = next(reader, None)
        if found is None:
            return []
        if [h.strip() for h in found] != header:
            raise CliError(f"--output {path} exists and is not a {what} file (header {found!r}); "
                           "remove it or choose another file")
        return list(reader)


@dataclass
class LoadedModel:
    """What ``--model`` resolved to: a module (or an already imported graph) and a description."""

    module: nn.Module | None
    description: str
    graph: Graph | None = None
    bundled: bool = False
    samples: tuple[torch.Tensor, torch.Tensor] | None = None  # inputs shipped with the model file
    info: dict[str, Any] = field(default_factory=dict)


X_KEYS = ("x", "X", "inputs", "input", "images", "data")
Y_KEYS = ("y", "Y", "labels", "label", "targets", "target")


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _import_module(name: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.exists():
            raise CliError(f"no such Python file: {name}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise CliError(f"cannot import module {name!r}: {err}") from err


def resolve_factory(path: str) -> nn.Module:
    """``module:factory`` -> ``factory()`` (or the module instance found at that name)."""
    module_name, _, attr = path.rpartition(":")
    if not module_name or not attr:
        raise CliError(f"expected 'module:factory' (or 'file.py:factory'), got {path!r}")
    obj: Any = _import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise CliError(f"{path!r} is neither an nn.Module nor a callable returning one")
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise CliError(f"{path}() returned {type(obj).__name__}, not an nn.Module")
    return obj


def _architecture(arch: str) -> nn.Module:
    from ..data.digits import ARCHITECTURES

    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]()
    if ":" in arch:
        return resolve_factory(arch)
    raise CliError(f"unknown architecture {arch!r}: give 'module:factory' or one of {sorted(ARCHITECTURES)}")


def _load_state(module: nn.Module, state: dict, source: str) -> nn.Module:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise CliError(f"the state dict in {source} does not fit the architecture: {err}") from err
    return module


#: Where boundprop's ONNX importer may live, and its entry point: ``fn(path, is_supported) -> Graph``.
ONNX_IMPORTERS = (("boundprop.onnx", "import_onnx"), ("boundprop.graph.onnx_import", "import_onnx"))


def _find_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _load_onnx(path: str) -> LoadedModel:
    from ..rules import is_supported

    for module_name, fn_name in ONNX_IMPORTERS:
        if not _find_module(module_name):
            continue
        fn = getattr(importlib.import_module(module_name), fn_name, None)
        if not callable(fn):
            continue
        try:
            graph = fn(path, is_supported)
        except NotImplementedError as err:  # UnsupportedOperatorError lists every unsupported op
            raise CliError(str(err)) from err
        except Exception as err:  # noqa: BLE001
            raise CliError(f"cannot import the ONNX model {path}: {err}") from err
        return LoadedModel(None, f"ONNX model {path} ({len(graph.nodes)} operations)", graph=graph)
    raise CliError("ONNX import not available yet: export the model from PyTorch and pass "
                   "'module:factory' or a .pt file instead")


def load_model(spec: str | None, arch: str | None = None) -> LoadedModel:
    """Resolve ``--model`` (and ``--arch``) into a :class:`LoadedModel` in eval mode."""
    if spec is None or spec == "digits":
        from ..data import bundle_info, load_digits_model

        if arch is not None:
            raise CliError("--arch applies to a state-dict file given with --model")
        model = load_digits_model()
        info = bundle_info()
        desc = (f"bundled digits classifier ({info['arch']}, {_count_params(model):,} parameters, naturally "
                f"trained, test accuracy {100 * info['test_accuracy']:.1f}%)")
        return LoadedModel(model, desc, bundled=True, info=info)
    if spec.lower().endswith(".onnx"):
        if not Path(spec).exists():
            raise CliError(f"no such file: {spec}")
        return _load_onnx(spec)
    if Path(spec).is_file() or spec.lower().endswith((".pt", ".pth")):
        if not Path(spec).is_file():
            raise CliError(f"no such file: {spec}")
        try:
            obj = torch.load(spec, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            raise CliError(f"cannot read {spec} with torch.load: {err}") from err
        samples = None
        if isinstance(obj, nn.Module):
            model = obj
        elif isinstance(obj, dict) and "state_dict" in obj and (arch or "arch" in obj):
            model = _load_state(_architecture(arch or obj["arch"]), obj["state_dict"], spec)
            if torch.is_tensor(obj.get("images")) and torch.is_tensor(obj.get("labels")):
                samples = (obj["images"].float(), obj["labels"].long())
        elif isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
            if arch is None:
                raise CliError(f"{spec} holds a state dict: name its architecture with --arch "
                               "(module:factory or a bundled architecture name)")
            model = _load_state(_architecture(arch), obj, spec)
        else:
            raise CliError(f"{spec} holds a {type(obj).__name__}, not an nn.Module or a state dict")
        return LoadedModel(model.eval(), f"{spec} ({type(model).__name__}, {_count_params(model):,} parameters)",
                           samples=samples)
    if ":" in spec:
        if arch is not None:
            raise CliError("--arch applies to a state-dict file given with --model")
        model = resolve_factory(spec)
        return LoadedModel(model.eval(), f"{spec} ({type(model).__name__}, {_count_params(model):,} parameters)")
    raise CliError(f"cannot interpret --model {spec!r}: give module:factory, a .pt file or a .onnx file")


def _pick(mapping: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in mapping:
            return mapping[key]
    return None


def load_inputs(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read ``--input``: ``(x, labels or None)``, x as float32 with the batch first."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"no such input file: {path}")
    suffix = p.suffix.lower()
    x: Any
    y: Any = None
    try:
        if suffix == ".npy":
            x = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
            x, y = _pick(arrays, X_KEYS), _pick(arrays, Y_KEYS)
            if x is None and len(arrays) == 1:
                x = next(iter(arrays.values()))
        elif suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                x, y = _pick(obj, X_KEYS), _pick(obj, Y_KEYS)
            elif isinstance(obj, (tuple, list)) and len(obj) == 2:
                x, y = obj
            else:
                x = obj
        else:
            raise CliError(f"--input must be a .pt, .pth, .npy or .npz file, got {path}")
    except CliError:
        raise
    except Exception as err:  # noqa: BLE001
        raise CliError(f"cannot read inputs from {path}: {err}") from err
    if x is None:
        raise CliError(f"{path} has no inputs under any of the keys {X_KEYS}")
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float()
    if x.dim() == 0:
        raise CliError(f"the inputs in {path} are a scalar; expected a batch (batch first)")
    if y is not None:
        y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y).long().reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise CliError(f"{path}: {x.shape[0]} inputs but {y.shape[0]} labels")
    return x, y
