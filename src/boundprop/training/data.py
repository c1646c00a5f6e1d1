"""Training data: the whole 8x8 digits data set (bundled) and synthetic classification data.

``digits_full.npz`` (written by ``scripts/make_digits_dataset.py`` from scikit-learn's
``load_digits``; 46 KiB) holds 1347 training and 450 test images as ``uint8`` pixels 0..16, split
like the bundled model's data: the 100 images of ``digits.pt`` are the first 100 test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

#: The whole digits data set (train and test parts).
DIGITS_FULL_PATH = Path(__file__).resolve().parents[1] / "data" / "digits_full.npz"


def load_digits_dataset(path: str | Path = DIGITS_FULL_PATH, train_limit: int | None = None,
                        test_limit: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` datasets of ``(image (1, 8, 8) float32 in [0, 1], label int64)``.

    ``train_limit`` / ``test_limit`` keep only the first images of each part (for quick runs).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python scripts/make_digits_dataset.py`")
    with np.load(path) as data:
        parts = []
        for split, limit in (("train", train_limit), ("test", test_limit)):
            x = torch.from_numpy(data[f"x_{split}"].astype(np.float32) / 16.0).unsqueeze(1)
            y = torch.from_numpy(data[f"y_{split}"].astype(np.int64))
            if limit is not None:
                x, y = x[:limit], y[:limit]
            parts.append(TensorDataset(x, y))
    return parts[0], parts[1]


def synthetic_dataset(n: int, num_classes: int, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> TensorDataset:
    """``n`` random inputs in ``[0, 1]`` with labels from a fixed random linear teacher (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=gen)
    teacher = torch.randn(int(np.prod(shape)), num_classes, generator=gen)
    y = ((x.reshape(n, -1) - 0.5) @ teacher).argmax(-1)
    return TensorDataset(x, y)


__all__ = ["DIGITS_FULL_PATH", "load_digits_dataset", "synthetic_dataset"]
