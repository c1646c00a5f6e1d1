"""Whole-pipeline checks on small ReLU networks (the rules' own tests live beside them)."""

import torch
import torch.nn as nn
from soundness import assert_sound

import boundprop


def test_mlp_sound_all_methods():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(3, 4)
    res = assert_sound(model, x, eps=0.3)
    width = {m: float((r.upper - r.lower).mean()) for m, r in res.items()}
    assert width["CROWN"] <= width["IBP"] + 1e-6


def test_cnn_residual_sound():
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1, stride=2)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 3 * 3, 5)

        def forward(self, x):
            h = torch.relu(self.c1(x)) + x.repeat(1, 2, 1, 1)
            h = torch.relu(self.bn(self.c2(h)))
            return self.fc(h.flatten(1))

    model = Net()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, 6, 6)
    assert_sound(model, x, eps=0.1)


def test_spec_matrix_and_unsupported_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(1, 3)
    g = boundprop.capture(model, x)
    C = torch.tensor([[[1.0, -1.0]]])
    ptb = {g.inputs[0]: boundprop.PerturbationLpNorm(0.1)}
    r = boundprop.compute_bounds(g, (x,), ptb, method="CROWN", C=C)
    full = boundprop.compute_bounds(g, (x,), ptb, method="CROWN")
    assert r.lower.shape == (1, 1)
    assert float(r.lower) >= float(full.lower[0, 0] - full.upper[0, 1]) - 1e-6


def test_conv_transpose_and_conv1d_all_methods():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 4, 3, stride=2, padding=1)
            self.t = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
            self.c1 = nn.Conv1d(3, 2, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.t(torch.relu(self.c(x))))
            return self.c1(h.flatten(2)[:, :, :10]).flatten(1)

    res = assert_sound(Net().eval(), torch.randn(2, 2, 6, 6), eps=0.1,
                       methods=("IBP", "CROWN-IBP", "CROWN", "forward", "alpha-CROWN"))
    width = {m: float((r.upper - r.lower).mean()) for m, r in res.items()}
    assert width["alpha-CROWN"] <= width["CROWN"] + 1e-6 <= width["IBP"] + 2e-6
