"""Margin specification matrices (boundprop.spec)."""

import pytest
import torch

from boundprop.spec import get_spec_matrix, margin_matrix


def test_margin_matrix_rows():
    labels = torch.tensor([0, 2, 3])
    C = margin_matrix(labels, 4)
    assert C.shape == (3, 3, 4) and C.dtype == torch.float32
    assert torch.equal(C[1], torch.tensor([[-1.0, 0, 1, 0], [0, -1, 1, 0], [0, 0, 1, -1]]))
    y = torch.randn(3, 4)
    margins = (C @ y.unsqueeze(-1)).squeeze(-1)
    for b, t in enumerate(labels.tolist()):
        expected = [y[b, t] - y[b, j] for j in range(4) if j != t]
        assert torch.allclose(margins[b], torch.stack(expected))


def test_get_spec_matrix_alias_dtype_device():
    X = torch.zeros(2, 5, dtype=torch.float64)
    C = get_spec_matrix(X, torch.tensor([1, 4]), 5)
    assert C.dtype == torch.float64 and C.shape == (2, 4, 5)
    assert torch.equal(C, margin_matrix(torch.tensor([1, 4]), 5, dtype=torch.float64))


def test_margin_matrix_errors():
    with pytest.raises(ValueError):
        margin_matrix(torch.tensor([3]), 3)
    with pytest.raises(ValueError):
        margin_matrix(torch.tensor([0]), 1)
