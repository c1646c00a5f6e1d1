"""Graph capture (torch.export, ONNX) into one IR, and the IR itself."""

from .capture import UnsupportedOperatorError, capture
from .ir import Graph, Node, Ref, evaluate

__all__ = ["Graph", "Node", "Ref", "UnsupportedOperatorError", "capture", "evaluate"]
