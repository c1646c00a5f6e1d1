"""Patches: linear coefficients that are local in space, for convolutional networks.

When a backward walk starts from a 2-D feature map ``(C0, H0, W0)`` with one specification row
per neuron, the coefficients of row ``r`` (neuron ``(c_r, h_r, w_r)``) on an earlier feature map
``(C, H, W)`` are nonzero only inside that neuron's receptive field, a window of ``kh x kw``
positions. A :class:`Patches` stores just those windows::

    data[b, r, c, i, j]  =  coefficient of row r on entry (c, top_r + i, left_r + j)
    top_r  = h_r * stride_h - padding_h,      left_r = w_r * stride_w - padding_w

All rows share the window size ``(kh, kw)``, ``stride`` and ``padding``; they differ only in
their anchor ``(h_r, w_r)`` in the start map. Window entries outside ``[0, H) x [0, W)`` stand for
the zero padding of a convolution and multiply nothing; they are zero unless ``dirty`` (then
:meth:`Patches.clean` zeroes them; ops that would read them call it first).

Memory per row is ``batch * C * kh * kw`` instead of ``batch * C * H * W``; a convolution maps
a window through ``conv_transpose2d`` of the window alone (``(kh - 1) s + d (k - 1) + 1`` wide
afterwards), so the cost of a walk grows with the receptive field, not with the image.

Shapes: ``data`` is ``(batch or 1, R, C, kh, kw)``; ``rows_h``/``rows_w`` are ``(R,)`` long
tensors. A batch dimension of 1 means "the same for every example" (until a relaxation that
depends on the example is applied).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..kernels import conv_transpose2d


@dataclass(frozen=True)
class Patches:
    """Coefficients of ``R`` specification rows on a ``(C, H, W)`` node, one spatial window per row.

    Attributes:
        data: ``(batch or 1, R, C, kh, kw)``.
        rows_h, rows_w: ``(R,)`` positions of the rows in the start node's grid.
        stride, padding: window of row ``r`` starts at ``rows * stride - padding`` (per axis).
        size: ``(H, W)`` of the node the coefficients multiply.
        row_range: ``(min h, max h, min w, max w)`` of the rows (Python ints, to size paddings).
        dirty: window entries outside the node may be nonzero (meaningless; see :meth:`clean`).
        unit: ``(R,)`` channels when ``data`` is still the one-hot identity of :meth:`identity`
            (a convolution then just picks weights), else None.
    """

    data: torch.Tensor
    rows_h: torch.Tensor
    rows_w: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    size: tuple[int, int]
    row_range: tuple[int, int, int, int]
    dirty: bool = False
    unit: torch.Tensor | None = None

    @staticmethod
    def identity(index: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype,
                 index_on_host: torch.Tensor | None = None) -> Patches:
        """One row per flat neuron index of a ``(C, H, W)`` node: ``C y = y[index]``. The row range is
        read from ``index_on_host`` (the same indices on the CPU) when given, else from ``index``."""
        C, H, W = shape
        rows_c, rows_h, rows_w = index // (H * W), (index // W) % H, index % W
        data = torch.zeros(1, index.numel(), C, 1, 1, dtype=dtype, device=index.device)
        data[0, torch.arange(index.numel(), device=index.device), rows_c] = 1.0
        host_h, host_w = (rows_h, rows_w) if index_on_host is None else ((index_on_host // W) % H, index_on_host % W)
        row_range = (int(host_h.min()), int(host_h.max()), int(host_w.min()), int(host_w.max()))
        return Patches(data, rows_h, rows_w, (1, 1), (0, 0), (H, W), row_range, unit=rows_c)

    @property
    def kernel(self) -> tuple[int, int]:
        return self.data.shape[-2], self.data.shape[-1]

    @property
    def spec(self) -> int:
        return self.data.shape[1]

    def with_data(self, data: torch.Tensor, dirty: bool | None = None) -> Patches:
        return replace(self, data=data, dirty=self.dirty if dirty is None else dirty, unit=None)

    # --- window geometry -------------------------------------------------------------------

    def _extent(self) -> tuple[int, int, int, int]:
        """Zero padding ``(top, bottom, left, right)`` that puts every window inside the node."""
        (kh, kw), (sh, sw), (ph, pw), (H, W) = self.kernel, self.stride, self.padding, self.size
        h0, h1, w0, w1 = self.row_range
        return (max(0, ph - h0 * sh), max(0, h1 * sh - ph + kh - H),
                max(0, pw - w0 * sw), max(0, w1 * sw - pw + kw - W))

    def _windows(self, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row/column indices ``(R, kh)``, ``(R, kw)`` of every window in a map padded by ``top``/``left``."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        dev = self.rows_h.device
        ih = (self.rows_h * sh - ph + top).unsqueeze(1) + torch.arange(kh, device=dev)
        iw = (self.rows_w * sw - pw + left).unsqueeze(1) + torch.arange(kw, device=dev)
        return ih, iw

    def gather(self, *maps: torch.Tensor) -> list[torch.Tensor]:
        """The windows of node-shaped tensors, zero outside the node.

        Each map is ``(b, C, H, W)`` (one value per neuron) or ``(b, R, C, H, W)`` (one per row
        and neuron); each result is ``(b, R, C, kh, kw)``, contiguous.

        For ``(b, C, H, W)`` maps, the windows of every position in the rows' bounding box are a
        strided view of the zero-padded map; each row picks its position's window from it, or,
        when there are many more rows than positions (many rows share a position: one per channel
        of the start map), from a copy of all windows (``unfold``), which is faster to index.
        """
        (kh, kw), (sh, sw), (ph, pw), (H, W) = self.kernel, self.stride, self.padding, self.size
        h0, h1, w0, w1 = self.row_range
        top, left = ph - h0 * sh, pw - w0 * sw  # negative: crop
        bottom, right = (h1 - h0) * sh + kh - H - top, (w1 - w0) * sw + kw - W - left
        positions = (h1 - h0 + 1) * (w1 - w0 + 1)
        out = []
        for t in maps:
            if t.dim() == 5:
                out.append(self._gather_per_row(t))
                continue
            padded = F.pad(t, (left, right, top, bottom))
            if self.spec >= 4 * positions:
                windows = F.unfold(padded, (kh, kw), stride=(sh, sw))  # (b, C * kh * kw, positions)
                position = (self.rows_h - h0) * (w1 - w0 + 1) + (self.rows_w - w0)
                picked = windows.transpose(1, 2).index_select(1, position)
                out.append(picked.view(t.shape[0], self.spec, t.shape[1], kh, kw))
            else:
                view = padded.unfold(2, kh, sh).unfold(3, kw, sw).permute(0, 2, 3, 1, 4, 5)  # (b, Lh, Lw, C, kh, kw)
                out.append(view[:, self.rows_h - h0, self.rows_w - w0])
        return out

    def _gather_per_row(self, t: torch.Tensor) -> torch.Tensor:
        """Windows of a ``(b, R, C, H, W)`` map, row ``r`` from ``t[:, r]``: ``(b, R, C, kh, kw)``."""
        (kh, kw), (sh, sw), (ph, pw), (H, W) = self.kernel, self.stride, self.padding, self.size
        h0, h1, w0, w1 = self.row_range
        top, left = ph - h0 * sh, pw - w0 * sw
        bottom, right = (h1 - h0) * sh + kh - H - top, (w1 - w0) * sw + kw - W - left
        view = F.pad(t, (left, right, top, bottom)).unfold(3, kh, sh).unfold(4, kw, sw)  # (b, R, C, Lh, Lw, kh, kw)
        rows = torch.arange(self.spec, device=t.device)
        return view[:, rows, :, self.rows_h - h0, self.rows_w - w0].transpose(0, 1).contiguous()  # (R, b, ...)

    def clean(self) -> Patches:
        """The same coefficients with every window entry outside the node set to zero."""
        if not self.dirty:
            return self
        if not any(self._extent()):
            return self.with_data(self.data, dirty=False)
        (H, W) = self.size
        ih, iw = self._windows(0, 0)
        inside = ((ih >= 0) & (ih < H))[:, :, None] & ((iw >= 0) & (iw < W))[:, None, :]
        return self.with_data(self.data * inside.unsqueeze(1).to(self.data.dtype), dirty=False)

    def to_dense(self) -> torch.Tensor:
        """The coefficients as a dense ``(b, R, C, H, W)`` tensor."""
        b, R, C, kh, kw = self.data.shape
        H, W = self.size
        top, bottom, left, right = self._extent()
        canvas = self.data.new_zeros(b, R, C, H + top + bottom, W + left + right)
        ih, iw = self._windows(top, left)
        rows = torch.arange(R, device=self.data.device)[:, None, None]
        canvas[:, rows, :, ih[:, :, None], iw[:, None, :]] = self.data.permute(1, 3, 4, 0, 2)
        return canvas[:, :, :, top:top + H, left:left + W]

    # --- propagation ---------------------------------------------------------------------

    def through_conv2d(self, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                       dilation: tuple[int, int], groups: int, in_size: tuple[int, int]) -> Patches:
        """Coefficients on ``x`` of the rows' ``A . conv2d(x, weight)`` (no bias).

        Each window goes through ``conv_transpose2d`` on its own (no padding): the new window is
        ``(kh - 1) * s + d * (k - 1) + 1`` wide and starts at ``top * s - p``, i.e. the new
        stride is ``stride * s`` and the new padding ``padding * s + p``. Entries that land on
        ``x``'s zero padding are left in place (``dirty``).
        """
        if self.unit is not None and groups == 1 and tuple(dilation) == (1, 1):
            out = weight.index_select(0, self.unit).unsqueeze(0)  # the transposed conv of a one-hot pixel
        else:
            data = self.clean().data
            b, R, C, kh, kw = data.shape
            out = conv_transpose2d(data.reshape(b * R, C, kh, kw), weight, stride, 0, 0, groups, dilation)
            out = out.reshape(b, R, *out.shape[1:])
        return replace(self, data=out, unit=None,
                       stride=(self.stride[0] * stride[0], self.stride[1] * stride[1]),
                       padding=(self.padding[0] * stride[0] + padding[0], self.padding[1] * stride[1] + padding[1]),
                       size=in_size, dirty=True)

    def channel_sum(self) -> torch.Tensor:
        """``sum over each window of data`` per channel: ``(b, R, C)`` (for per-channel constants)."""
        return self.clean().data.sum((-2, -1))

    def window_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``sum over each row's window of data * t`` for a node-shaped ``t`` -> ``(b, R)``."""
        (window,) = self.gather(t)
        return _dot(self.data, window)

    def concretize_box(self, center: torch.Tensor, radius: torch.Tensor, sign: int) -> torch.Tensor:
        """``min`` (sign -1) or ``max`` (+1) of each row over the box ``center +- radius``: ``(b, R)``.

        Entries outside the node meet zero center and radius (gathered with zero padding).
        """
        c, r = self.gather(center, radius)
        return _dot(self.data, c) + sign * _dot(self.data.abs(), r)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products of two ``(b, R, ...)`` tensors (batch dimensions broadcast): ``(b, R)``."""
    return torch.einsum("brn,brn->br", a.flatten(2), b.flatten(2))


def add_coefficients(a, b):
    """Sum of two coefficient sets (Tensor or Patches, None meaning zero).

    Patches of the same rows, node and stride are added on the union of their windows; anything
    else is added densely.
    """
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, Patches) and isinstance(b, Patches):
        total = _add_patches(a, b)
        if total is not None:
            return total
    if isinstance(a, Patches):
        a = a.to_dense()
    if isinstance(b, Patches):
        b = b.to_dense()
    return a + b


def _add_patches(a: Patches, b: Patches) -> Patches | None:
    if (a.stride != b.stride or a.size != b.size or a.rows_h is not b.rows_h and not (
            torch.equal(a.rows_h, b.rows_h) and torch.equal(a.rows_w, b.rows_w))):
        return None
    dirty = a.dirty or b.dirty
    if a.padding == b.padding and a.kernel == b.kernel:
        return a.with_data(a.data + b.data, dirty)
    ph, pw = max(a.padding[0], b.padding[0]), max(a.padding[1], b.padding[1])
    kh = max(p.kernel[0] + ph - p.padding[0] for p in (a, b))
    kw = max(p.kernel[1] + pw - p.padding[1] for p in (a, b))
    if (b.padding, b.kernel) == ((ph, pw), (kh, kw)):
        a, b = b, a
    if (a.padding, a.kernel) == ((ph, pw), (kh, kw)):  # a's window holds b's: add b into a slice
        top, left = ph - b.padding[0], pw - b.padding[1]
        data = a.data.expand(max(a.data.shape[0], b.data.shape[0]), *a.data.shape[1:]).clone()
        data[..., top:top + b.kernel[0], left:left + b.kernel[1]] += b.data
        return a.with_data(data, dirty)

    def grow(p: Patches) -> torch.Tensor:
        top, left = ph - p.padding[0], pw - p.padding[1]
        return F.pad(p.data, (left, kw - left - p.kernel[1], top, kh - top - p.kernel[0]))

    return replace(a, data=grow(a) + grow(b), padding=(ph, pw), dirty=dirty, unit=None)
