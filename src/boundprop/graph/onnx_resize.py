"""ONNX ``Resize`` (and the older ``Upsample``) as ops that boundprop already bounds.

A resize acts on each axis separately. Along one axis of input length ``n`` and output length
``m``, output position ``j`` reads the input at the source coordinate ``c_j`` that the
``coordinate_transformation_mode`` gives (``s`` = the axis's scale, ``m / n`` when sizes are given)::

    half_pixel          c = (j + 0.5) / s - 0.5
    pytorch_half_pixel  c = (j + 0.5) / s - 0.5 if m > 1 else 0
    half_pixel_symmetric c = n/2 (1 - m / (s n)) + (j + 0.5) / s - 0.5
    align_corners       c = j (n - 1) / (m - 1)            (0 if m = 1)
    asymmetric          c = j / s
    tf_half_pixel_for_nn c = (j + 0.5) / s

and then:

* ``nearest``: ``y_j = x_{k_j}`` with ``k_j`` = ``c_j`` rounded by ``nearest_mode`` and clamped to
  ``[0, n - 1]``: an ``index_select`` (data movement: IBP on both ends is exact).
* ``linear``: ``y_j = (1 - f) x_k + f x_{k+1}``, ``c`` clamped to ``[0, n - 1]``, ``k = floor(c)``,
  ``f = c - k``; ``cubic``: four neighbours ``k - 1 .. k + 2`` with Keys' weights (parameter
  ``cubic_coeff_a``), indices clamped to the edge (or, with ``exclude_outside``, the outside
  weights dropped and the rest renormalised). Either way ``y = M x`` along the axis, with a
  constant ``(m, n)`` matrix ``M``: a ``linear`` op on that axis (moved last, then back).

The maps are computed once, at import, in float32 as onnxruntime computes them, so rounding ties
fall the same way. ``tf_crop_and_resize`` (regions of interest, extrapolation) and anti-aliased
downsampling are not supported and are reported as such.
"""

from __future__ import annotations

import math

import torch

_MODES = ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric", "align_corners", "asymmetric",
          "tf_half_pixel_for_nn")


def source_coordinates(mode: str, n: int, m: int, scale: float) -> torch.Tensor:
    """``c_j`` for ``j = 0 .. m-1`` (float32), as in the module docstring."""
    j = torch.arange(m, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    if mode == "half_pixel":
        return (j + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (j + 0.5) / s - 0.5 if m > 1 else torch.zeros(m)
    if mode == "half_pixel_symmetric":
        adjustment = torch.tensor(m, dtype=torch.float32) / (s * n)
        offset = (torch.tensor(n, dtype=torch.float32) / 2) * (1 - adjustment)
        return offset + (j + 0.5) / s - 0.5
    if mode == "align_corners":
        return j * (n - 1) / (m - 1) if m > 1 else torch.zeros(m)
    if mode == "asymmetric":
        return j / s
    if mode == "tf_half_pixel_for_nn":
        return (j + 0.5) / s
    raise ValueError(mode)


def nearest_indices(coords: torch.Tensor, rounding: str, n: int, downsampling: bool) -> torch.Tensor:
    """Source index of every output position: ``coords`` rounded, clamped to ``[0, n - 1]``.

    ``rounding``: ONNX ``nearest_mode`` (``round_prefer_floor``, ``round_prefer_ceil``, ``floor``,
    ``ceil``), or ``simple`` (``Upsample``: truncation, or ceiling when downsampling).
    """
    if rounding == "round_prefer_floor":
        k = torch.where(coords == torch.floor(coords) + 0.5, torch.floor(coords), torch.round(coords))
    elif rounding == "round_prefer_ceil":
        k = torch.where(coords == torch.floor(coords) + 0.5, torch.ceil(coords), torch.round(coords))
    elif rounding == "floor":
        k = torch.floor(coords)
    elif rounding == "ceil":
        k = torch.ceil(coords)
    elif rounding == "simple":
        k = torch.ceil(coords) if downsampling else torch.trunc(coords)
    else:
        raise ValueError(rounding)
    return k.clamp(0, n - 1).long()


def _cubic_weights(f: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution weights of the neighbours at offsets -1, 0, 1, 2: ``(m, 4)``."""
    def far(t):  # 1 <= |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    def near(t):  # |t| < 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    return torch.stack([far(f + 1), near(f), near(1 - f), far(2 - f)], 1)


def interpolation_matrix(coords: torch.Tensor, n: int, kind: str, cubic_a: float = -0.75,
                         exclude_outside: bool = False) -> torch.Tensor:
    """``M`` (``(m, n)``, float32) with ``y = M x`` along the axis, for ``linear`` or ``cubic``."""
    m = coords.shape[0]
    rows = torch.arange(m)
    M = torch.zeros(m, n, dtype=torch.float32)
    if kind == "linear":
        c = coords.clamp(0, n - 1)
        k = torch.floor(c).long().clamp(max=n - 1)
        f = c - k
        M.index_put_((rows, k), 1 - f, accumulate=True)
        M.index_put_((rows, (k + 1).clamp(max=n - 1)), f, accumulate=True)
        return M
    k = torch.floor(coords)
    w = _cubic_weights(coords - k, cubic_a)
    idx = k.long().unsqueeze(1) + torch.arange(-1, 3).unsqueeze(0)
    if exclude_outside:
        w = torch.where((idx >= 0) & (idx < n), w, torch.zeros(()))
        w = w / w.sum(1, keepdim=True)
    for t in range(4):
        M.index_put_((rows, idx[:, t].clamp(0, n - 1)), w[:, t], accumulate=True)
    return M


def output_lengths(in_shape: tuple[int, ...], scales: list[float] | None, sizes: list[int] | None) -> list[int]:
    """Output length of every axis: ``sizes``, or ``floor(n * s)`` in float32 as onnxruntime takes it."""
    if sizes:
        return list(sizes)
    return [int(math.floor(float(torch.tensor(n, dtype=torch.float32) * torch.tensor(s, dtype=torch.float32))))
            for n, s in zip(in_shape, scales)]


def axis_plan(attrs: dict, n: int, m: int, scale: float) -> tuple[str, torch.Tensor] | None:
    """``("index", k)`` or ``("matrix", M)`` for one axis, None where the axis is unchanged.

    Raises ValueError naming an unsupported setting.
    """
    mode = attrs["mode"]
    transform = attrs["coordinate_transformation_mode"]
    if transform not in _MODES:
        raise ValueError(f"coordinate_transformation_mode={transform}")
    if mode not in ("nearest", "linear", "cubic"):
        raise ValueError(f"mode={mode}")
    if attrs.get("antialias") and m < n and mode != "nearest":
        raise ValueError("antialias=1 when downsampling")
    coords = source_coordinates(transform, n, m, scale)
    if mode == "nearest":
        k = nearest_indices(coords, attrs["nearest_mode"], n, scale < 1)
        if m == n and torch.equal(k, torch.arange(n)):
            return None
        return "index", k
    M = interpolation_matrix(coords, n, mode, float(attrs.get("cubic_coeff_a", -0.75)),
                             bool(attrs.get("exclude_outside", 0)))
    if m == n and torch.equal(M, torch.eye(n)):
        return None
    return "matrix", M
