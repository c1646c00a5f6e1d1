"""A zoo of tiny models with the architectures of the auto_LiRPA paper, for tests and benchmarks.

Every entry is a factory ``name(**kw) -> nn.Module`` (keyword arguments set the widths and the
``seed``; the defaults keep each model small enough to bound by CROWN in well under a second on
one CPU thread) and an input shape without the batch dimension::

    factory, shape = ZOO["resnet"]
    model = factory()               # eval mode, deterministic weights for a given seed
    x = torch.randn(4, *shape)

Models with BatchNorm are returned in eval mode with random (non-trivial) running statistics and
affine parameters, so that BatchNorm is never the identity. Factories do not touch the global
random state (they draw from their own generator).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# helpers


def _factory(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Run a factory without touching the global random state (layer constructors draw from it)."""

    @functools.wraps(fn)
    def build(*args, **kwargs) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return build


def _finish(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw all parameters and BN statistics from a private generator; return it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                module.weight.copy_((torch.rand(module.weight.shape, generator=gen) * 2 - 1) * bound * math.sqrt(3))
                if module.bias is not None:
                    module.bias.copy_((torch.rand(module.bias.shape, generator=gen) * 2 - 1) * bound)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = module.num_features
                module.running_mean.copy_((torch.rand(n, generator=gen) - 0.5) * 0.4)
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.weight.copy_(0.7 + 0.6 * torch.rand(n, generator=gen))
                module.bias.copy_((torch.rand(n, generator=gen) - 0.5) * 0.2)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.copy_(0.8 + 0.4 * torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_((torch.rand(module.bias.shape, generator=gen) - 0.5) * 0.2)
            elif isinstance(module, nn.LSTM):
                bound = 1.0 / math.sqrt(module.hidden_size)
                for p in module.parameters():
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    return model.eval()


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


# --------------------------------------------------------------------------------------------
# fully connected and plain convolutional


@_factory
def mlp(in_dim: int = 8, hidden: int = 16, out: int = 3, depth: int = 2, seed: int = 0) -> nn.Module:
    """``in_dim -> (hidden, ReLU) x depth -> out``; input ``(in_dim,)``."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out))
    return _finish(nn.Sequential(*layers), seed)


@_factory
def cnn(channels: int = 1, width: int = 4, size: int = 8, out: int = 10, seed: int = 0) -> nn.Module:
    """Conv(3x3)-ReLU, Conv(3x3, stride 2)-ReLU, Flatten, Linear; input ``(channels, size, size)``."""
    half = (size + 1) // 2
    return _finish(nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * half * half, out)), seed)


@_factory
def cnn7_bn(channels: int = 3, width: int = 4, size: int = 8, fc: int = 32, out: int = 10,
            seed: int = 0) -> nn.Module:
    """CNN-7 of the auto_LiRPA/CROWN-IBP papers with BatchNorm: 5 conv-BN-ReLU, FC-BN-ReLU, FC.

    Channels ``w, w, 2w, 2w, 2w`` (the third conv has stride 2); input ``(channels, size, size)``.
    """
    w = width
    half = (size + 1) // 2
    return _finish(nn.Sequential(
        *_conv_bn(channels, w), nn.ReLU(),
        *_conv_bn(w, w), nn.ReLU(),
        *_conv_bn(w, 2 * w, stride=2), nn.ReLU(),
        *_conv_bn(2 * w, 2 * w), nn.ReLU(),
        *_conv_bn(2 * w, 2 * w), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * w * half * half, fc), nn.BatchNorm1d(fc), nn.ReLU(),
        nn.Linear(fc, out)), seed)


@_factory
def bn_pool_cnn(channels: int = 2, width: int = 4, size: int = 8, out: int = 5, seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-MaxPool(2), Conv-BN-ReLU-AvgPool(2), Flatten, Linear; input ``(channels, size, size)``."""
    quarter = size // 4
    return _finish(nn.Sequential(
        *_conv_bn(channels, width), nn.ReLU(), nn.MaxPool2d(2),
        *_conv_bn(width, 2 * width), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * quarter * quarter, out)), seed)


# --------------------------------------------------------------------------------------------
# residual families


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, stride=stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout)
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, k=1, stride=stride))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, basic blocks (the first of each later stage with stride 2), global
    average pooling, linear head."""

    def __init__(self, channels: int, widths: tuple[int, ...], blocks: int, out: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(channels, widths[0]), nn.ReLU())
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


@_factory
def resnet(channels: int = 3, widths: tuple[int, ...] = (4, 8), blocks: int = 1, out: int = 10,
           seed: int = 0) -> nn.Module:
    """A ResNet of basic blocks with BatchNorm; input ``(channels, 8, 8)`` by default."""
    return _finish(ResNet(channels, widths, blocks, out), seed)


class WideBlock(nn.Module):
    """Wide-ResNet block (pre-activation): ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut(x)``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        return h + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(self, channels: int, base: int, widen: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, base, 3, padding=1, bias=False)
        self.block1 = WideBlock(base, base * widen)
        self.block2 = WideBlock(base * widen, 2 * base * widen, stride=2)
        self.bn = nn.BatchNorm2d(2 * base * widen)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * base * widen, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(self.conv(x)))
        return self.fc(self.pool(F.relu(self.bn(h))).flatten(1))


@_factory
def wide_resnet(channels: int = 3, base: int = 2, widen: int = 2, out: int = 10, seed: int = 0) -> nn.Module:
    """Wide-ResNet with two pre-activation blocks of width ``base * widen`` and ``2 * base * widen``."""
    return _finish(WideResNet(channels, base, widen, out), seed)


class DenseLayer(nn.Module):
    """``cat([x, conv(relu(bn(x)))], dim=1)``: adds ``growth`` channels."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class DenseNet(nn.Module):
    def __init__(self, channels: int, growth: int, layers: int, out: int) -> None:
        super().__init__()
        c = 2 * growth
        self.conv = nn.Conv2d(channels, c, 3, padding=1, bias=False)
        block1 = []
        for _ in range(layers):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        # transition: BN-ReLU-conv1x1-avgpool, halving the channels
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        c //= 2
        block2 = []
        for _ in range(layers):
            block2.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*block2)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.transition(self.block1(self.conv(x))))
        return self.fc(self.pool(F.relu(self.bn(h))).flatten(1))


@_factory
def densenet(channels: int = 3, growth: int = 2, layers: int = 2, out: int = 10, seed: int = 0) -> nn.Module:
    """DenseNet: two dense blocks (concatenation with ``torch.cat``) and a transition layer."""
    return _finish(DenseNet(channels, growth, layers, out), seed)


class ResNeXtBlock(nn.Module):
    """Bottleneck with a grouped 3x3 conv: ``relu(bn(1x1(relu(bn(gconv(relu(bn(1x1 x))))))) + sc(x))``."""

    def __init__(self, cin: int, cout: int, cardinality: int, group_width: int, stride: int = 1) -> None:
        super().__init__()
        inner = cardinality * group_width
        self.reduce = nn.Sequential(*_conv_bn(cin, inner, k=1), nn.ReLU())
        self.grouped = nn.Sequential(*_conv_bn(inner, inner, stride=stride, groups=cardinality), nn.ReLU())
        self.expand = nn.Sequential(*_conv_bn(inner, cout, k=1))
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, k=1, stride=stride))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.expand(self.grouped(self.reduce(x))) + self.shortcut(x))


class ResNeXt(nn.Module):
    def __init__(self, channels: int, cardinality: int, group_width: int, out: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(channels, 8), nn.ReLU())
        self.block1 = ResNeXtBlock(8, 8, cardinality, group_width)
        self.block2 = ResNeXtBlock(8, 16, cardinality, group_width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block2(self.block1(self.stem(x)))).flatten(1))


@_factory
def resnext(channels: int = 3, cardinality: int = 2, group_width: int = 2, out: int = 10,
            seed: int = 0) -> nn.Module:
    """ResNeXt: two bottleneck blocks whose 3x3 conv is grouped (``groups=cardinality``)."""
    return _finish(ResNeXt(channels, cardinality, group_width, out), seed)


# --------------------------------------------------------------------------------------------
# sequence models and smooth activations


class TinyTransformer(nn.Module):
    """One post-norm encoder layer on continuous token embeddings ``(batch, T, d)``.

    ``h = LN(x + W_o softmax(Q K^T / sqrt(d_head)) V)`` (``heads`` heads, written with ``nn.Linear``
    and ``torch.matmul``), ``z = LN(h + FFN(h))`` with ``FFN = Linear-act-Linear``, then the mean
    over tokens and a linear head.
    """

    def __init__(self, d: int, heads: int, ffn: int, out: int, activation: str) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ffn)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.ff2 = nn.Linear(ffn, d)
        self.ln2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # (b, heads, T, dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d)
        h = self.ln1(x + self.o(ctx))
        z = self.ln2(h + self.ff2(self.act(self.ff1(h))))
        return self.head(z.mean(dim=1))


@_factory
def transformer(tokens: int = 3, d: int = 4, heads: int = 1, ffn: int = 8, out: int = 3,
                activation: str = "relu", seed: int = 0) -> nn.Module:
    """A one-layer Transformer encoder with softmax attention and LayerNorm; input ``(tokens, d)``."""
    return _finish(TinyTransformer(d, heads, ffn, out, activation), seed)


class TinyLSTM(nn.Module):
    """An LSTM over ``(batch, T, d)`` with a linear head on the last hidden state.

    By default the cell is unrolled explicitly (gates ``i, f, g, o`` from ``nn.Linear`` layers,
    ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)``, ``h_0 = c_0 = 0``), so every
    intermediate tensor keeps the batch first. ``native=True`` uses ``nn.LSTM`` (batch first)
    instead, which runs time-major inside; capture unrolls it (:mod:`boundprop.graph.recurrent`).
    """

    def __init__(self, d: int, hidden: int, out: int, native: bool = False) -> None:
        super().__init__()
        self.native = native
        if native:
            self.lstm = nn.LSTM(d, hidden, batch_first=True)
        else:
            self.ih = nn.Linear(d, 4 * hidden)
            self.hh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            seq, _ = self.lstm(x)
            return self.head(seq[:, -1])
        h = c = None
        for t in range(x.shape[1]):
            gates = self.ih(x[:, t])
            if h is not None:
                gates = gates + self.hh(h)
            i, f, g, o = gates.chunk(4, dim=1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c = i * g if c is None else f * c + i * g
            h = o * torch.tanh(c)
        return self.head(h)


@_factory
def lstm(tokens: int = 3, d: int = 4, hidden: int = 6, out: int = 3, native: bool = False,
         seed: int = 0) -> nn.Module:
    """An LSTM classifier unrolled over ``tokens`` steps (``native=True``: ``nn.LSTM``); input ``(tokens, d)``."""
    return _finish(TinyLSTM(d, hidden, out, native), seed)


@_factory
def gelu_layernorm_mlp(in_dim: int = 8, hidden: int = 16, out: int = 3, depth: int = 2,
                       seed: int = 0) -> nn.Module:
    """``(Linear, LayerNorm, GELU) x depth, Linear``; input ``(in_dim,)``."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
        width = hidden
    layers.append(nn.Linear(width, out))
    return _finish(nn.Sequential(*layers), seed)


#: name -> (factory, input shape without the batch dimension)
ZOO: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (8,)),
    "cnn": (cnn, (1, 8, 8)),
    "cnn7_bn": (cnn7_bn, (3, 8, 8)),
    "resnet": (resnet, (3, 8, 8)),
    "wide_resnet": (wide_resnet, (3, 8, 8)),
    "densenet": (densenet, (3, 8, 8)),
    "resnext": (resnext, (3, 8, 8)),
    "transformer": (transformer, (3, 4)),
    "lstm": (lstm, (3, 4)),
    "gelu_layernorm_mlp": (gelu_layernorm_mlp, (8,)),
    "bn_pool_cnn": (bn_pool_cnn, (2, 8, 8)),
}

#: Models built only from ReLU, affine ops, BatchNorm (eval) and average pooling.
RELU_MODELS = ("mlp", "cnn", "cnn7_bn", "resnet", "wide_resnet", "densenet", "resnext")


def build(name: str, **kw) -> tuple[nn.Module, tuple[int, ...]]:
    """``ZOO[name]``'s model (built with ``kw``) and its input shape."""
    factory, shape = ZOO[name]
    return factory(**kw), shape


__all__ = ["RELU_MODELS", "ZOO", "build", *ZOO]
