"""boundprop: provable bounds on neural network outputs under input and weight perturbations."""

from .algorithms import BoundResult, compute_bounds
from .algorithms.jacobian import JacobianBounds, jacobian_bounds, lipschitz_bound
from .bab import VerificationResult, VerifierOptions, verify
from .compat import BoundedModule, BoundedParameter, BoundedTensor
from .domains import Interval
from .graph import Graph, UnsupportedOperatorError
from .perturbation import Perturbation, PerturbationL0Norm, PerturbationLpNorm, PerturbationSynonym, perturb_parameters
from .rules import is_supported
from .training.wrappers import CrossEntropyWrapper, CrossEntropyWrapperMultiInput


def capture(model, example_inputs) -> Graph:
    """Capture ``model`` once into boundprop's IR (see :func:`boundprop.graph.capture`)."""
    from .graph import capture as _capture

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return _capture(model, example_inputs, is_supported)


def load_onnx(path) -> Graph:
    """Import an ONNX model (path or ``onnx.ModelProto``) into boundprop's IR."""
    from .graph.onnx_import import import_onnx

    return import_onnx(path, is_supported)


__all__ = [
    "BoundResult", "BoundedModule", "BoundedParameter", "BoundedTensor", "CrossEntropyWrapper",
    "CrossEntropyWrapperMultiInput", "Graph", "Interval", "Perturbation",
    "PerturbationLpNorm", "UnsupportedOperatorError", "capture", "compute_bounds", "load_onnx",
    "PerturbationL0Norm", "PerturbationSynonym", "perturb_parameters", "JacobianBounds", "jacobian_bounds",
    "lipschitz_bound", "VerificationResult", "VerifierOptions", "verify",
]
