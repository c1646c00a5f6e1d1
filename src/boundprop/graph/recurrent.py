"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` as explicit batch-first steps, for capture.

PyTorch's recurrent layers run time-major inside (their decomposition permutes the input to
``(T, batch, d)``), and boundprop bounds only graphs whose tensors keep the batch first
(:func:`~boundprop.graph.capture._check_batch_first`). So during capture each such layer is swapped,
temporarily and in place, for :class:`UnrolledRecurrence`: the same ``Parameter`` objects under the
same names (the graph reads them live by qualified name), and a loop over time on ``(batch, d)``
slices. Per step, with ``x`` the step's input and ``h`` (``c``) the state (zero at the start, where
the terms with it are left out)::

    LSTM:  i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)
           c' = sigmoid(f) c + sigmoid(i) tanh(g),   h' = sigmoid(o) tanh(c')   (then W_hr h' with proj_size)
    GRU:   r, z, n_x = split(W_ih x + b_ih),  r_h, z_h, n_h = split(W_hh h + b_hh)
           r = sigmoid(r + r_h),  z = sigmoid(z + z_h),  n = tanh(n_x + r n_h),  h' = (1 - z) n + z h
    RNN:   h' = tanh or relu(W_ih x + b_ih + W_hh h + b_hh)

Layers stack; a bidirectional layer runs a second pass backwards in time and concatenates the two
states of each step. The outputs keep the layer's layout (``output`` time-major unless
``batch_first``; ``h_n``, ``c_n`` of shape ``(layers * directions, batch, hidden)``): capture folds
``stack(xs, d)[..., i]`` back into ``xs[i]``, so that the usual ``output[:, -1]`` and ``h_n[-1]``
read a step's tensor directly and the graph keeps the batch first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class UnrolledRecurrence(nn.Module):
    """The computation of a recurrent layer ``layer`` (eval mode: no dropout), step by step."""

    def __init__(self, layer: nn.RNNBase) -> None:
        super().__init__()
        self.mode = layer.mode  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
        self.layers, self.directions = layer.num_layers, 2 if layer.bidirectional else 1
        self.batch_first, self.hidden = layer.batch_first, layer.hidden_size
        self.proj = getattr(layer, "proj_size", 0)
        for name, p in layer.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def _weights(self, layer: int, direction: int) -> dict[str, torch.Tensor | None]:
        suffix = f"l{layer}" + ("_reverse" if direction else "")
        return {k: getattr(self, f"{k}_{suffix}", None) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                                   "weight_hr")}

    def _step(self, w: dict, x: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None):
        gates_x = F.linear(x, w["weight_ih"], w["bias_ih"])
        gates_h = F.linear(h, w["weight_hh"], w["bias_hh"]) if h is not None else w["bias_hh"]
        if self.mode == "GRU":
            r_x, z_x, n_x = gates_x.chunk(3, 1)
            if gates_h is None:
                r_h = z_h = n_h = None
            else:
                r_h, z_h, n_h = gates_h.chunk(3, -1)
            r = torch.sigmoid(r_x if r_h is None else r_x + r_h)
            z = torch.sigmoid(z_x if z_h is None else z_x + z_h)
            n = torch.tanh(n_x if n_h is None else n_x + r * n_h)
            return ((1 - z) * n if h is None else (1 - z) * n + z * h), None
        gates = gates_x if gates_h is None else gates_x + gates_h
        if self.mode != "LSTM":
            return (torch.tanh(gates) if self.mode == "RNN_TANH" else torch.relu(gates)), None
        i, f, g, o = gates.chunk(4, 1)
        cell = torch.sigmoid(i) * torch.tanh(g)
        if c is not None:
            cell = torch.sigmoid(f) * c + cell
        out = torch.sigmoid(o) * torch.tanh(cell)
        if w["weight_hr"] is not None:
            out = F.linear(out, w["weight_hr"])
        return out, cell

    def forward(self, x: torch.Tensor, hx=None):
        if x.dim() != 3:
            raise NotImplementedError("boundprop bounds recurrent layers on batched (3-D) inputs only")
        steps = list(x.unbind(1 if self.batch_first else 0))
        if self.mode == "LSTM":
            h0, c0 = hx if hx is not None else (None, None)
        else:
            h0, c0 = hx, None
        last_h, last_c = [], []
        for layer in range(self.layers):
            outputs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                w = self._weights(layer, direction)
                h = h0[k] if h0 is not None else None
                c = c0[k] if c0 is not None else None
                order = range(len(steps) - 1, -1, -1) if direction else range(len(steps))
                found = [None] * len(steps)
                for t in order:
                    h, c = self._step(w, steps[t], h, c)
                    found[t] = h
                outputs.append(found)
                last_h.append(h)
                last_c.append(c)
            steps = [torch.cat(parts, 1) if len(parts) > 1 else parts[0] for parts in zip(*outputs)]
        output = torch.stack(steps, 1 if self.batch_first else 0)
        h_n = torch.stack(last_h, 0)
        if self.mode == "LSTM":
            return output, (h_n, torch.stack(last_c, 0))
        return output, h_n


@contextlib.contextmanager
def unrolled_recurrences(model: nn.Module) -> Iterator[None]:
    """Swap every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` in ``model`` for :class:`UnrolledRecurrence` while
    the block runs; put them back after."""
    swapped = []
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.LSTM, nn.GRU, nn.RNN)):
                setattr(parent, name, UnrolledRecurrence(child))
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
