"""``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (:mod:`boundprop.graph.recurrent`): unrolled batch first at capture.

The unrolled module computes what the layer computes (every configuration: layers, directions,
layouts, biases, projections, given states); captured models read a step of the output or of ``h_n``
without a tensor that puts time before the batch, and their bounds hold under every method.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from soundness import assert_sound

import boundprop
from boundprop.graph.recurrent import UnrolledRecurrence

LAYERS = {
    "lstm": lambda: nn.LSTM(3, 4, batch_first=True),
    "lstm-2-bidirectional-time-major": lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True),
    "lstm-projection": lambda: nn.LSTM(3, 5, proj_size=2, batch_first=True),
    "lstm-no-bias": lambda: nn.LSTM(3, 4, bias=False, batch_first=True),
    "gru-2": lambda: nn.GRU(3, 5, num_layers=2, batch_first=True),
    "gru-bidirectional": lambda: nn.GRU(3, 4, bidirectional=True, batch_first=True),
    "rnn-relu": lambda: nn.RNN(3, 4, nonlinearity="relu", batch_first=True),
    "rnn-tanh-time-major": lambda: nn.RNN(3, 4),
}


def _flat(out) -> torch.Tensor:
    seq, state = out
    return torch.cat([t.flatten() for t in (seq, *(state if isinstance(state, tuple) else (state,)))])


@pytest.mark.parametrize("name", LAYERS)
def test_unrolled_layer_computes_the_layer(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().eval()
    x = torch.randn(2, 5, 3) if layer.batch_first else torch.randn(5, 2, 3)
    unrolled = UnrolledRecurrence(layer)
    torch.testing.assert_close(_flat(unrolled(x)), _flat(layer(x)), atol=1e-6, rtol=1e-5)
    states = layer.num_layers * (2 if layer.bidirectional else 1)
    h = torch.randn(states, 2, layer.proj_size or layer.hidden_size)
    hx = (h, torch.randn(states, 2, layer.hidden_size)) if isinstance(layer, nn.LSTM) else h
    torch.testing.assert_close(_flat(unrolled(x, hx)), _flat(layer(x, hx)), atol=1e-6, rtol=1e-5)
    assert dict(unrolled.named_parameters()).keys() == dict(layer.named_parameters()).keys()


class Head(nn.Module):
    """A recurrent layer on batch-first input and a linear head on the last step (or on ``h_n[-1]``)."""

    def __init__(self, layer: nn.RNNBase, read: str) -> None:
        super().__init__()
        self.layer, self.read = layer, read
        width = layer.hidden_size * (2 if layer.bidirectional and read == "output" else 1)
        self.head = nn.Linear(layer.proj_size or width, 2)

    def forward(self, x):
        output, state = self.layer(x)
        if self.read == "output":
            return self.head(torch.relu(output[:, -1]))
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])


@pytest.mark.parametrize("name,read", [("lstm", "output"), ("lstm-projection", "state"), ("gru-2", "state"),
                                       ("gru-bidirectional", "output"), ("rnn-relu", "output")])
def test_captured_recurrence_sound(name, read):
    torch.manual_seed(1)
    model = Head(LAYERS[name](), read).eval()
    x = torch.randn(2, 4, 3)
    graph = boundprop.capture(model, x)
    assert type(model.layer).__name__ in ("LSTM", "GRU", "RNN"), "capture must put the layer back"
    assert torch.ops.aten.permute.default not in [n.target for n in graph.nodes]
    res = assert_sound(model, x, eps=0.1, graph=graph, methods=("IBP", "CROWN-IBP", "CROWN", "forward"),
                       n_random=64)
    assert float((res["CROWN"].upper - res["CROWN"].lower).mean()) < float((res["IBP"].upper - res["IBP"].lower).mean())


def test_time_major_input_reported():
    """A model that transposes its batch-first input for a time-major layer moves the batch: reported."""

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = nn.GRU(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.layer(x.transpose(0, 1))[0][-1])

    with pytest.raises(boundprop.UnsupportedOperatorError, match="batch dimension"):
        boundprop.capture(TimeMajor().eval(), torch.randn(2, 4, 3))
