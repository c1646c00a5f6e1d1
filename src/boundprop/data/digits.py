"""The bundled 8x8 handwritten-digits classifier and its samples.

The data are scikit-learn's ``load_digits`` (1797 grey-level 8x8 images of the digits 0-9, pixel
values 0..16), scaled to ``[0, 1]``. ``scripts/make_bundled_model.py`` trains the classifier
(naturally, no certified training) and writes :data:`BUNDLE_PATH`, one small ``.pt`` file with:

* ``arch``: the architecture's name, a key of :data:`ARCHITECTURES`;
* ``state_dict``: its trained weights;
* ``images``: ``(n, 1, 8, 8)`` float32 real test images in ``[0, 1]`` (never seen in training);
* ``labels``: ``(n,)`` int64 true classes;
* ``meta``: a dict of plain values (test accuracy, seed, epochs, ...).

Loading needs only torch (the file is read with ``weights_only=True``), not scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

#: The bundled model and samples (written by ``scripts/make_bundled_model.py``).
BUNDLE_PATH = Path(__file__).with_name("digits.pt")

NUM_CLASSES = 10
INPUT_SHAPE = (1, 8, 8)


def digits_mlp() -> nn.Module:
    """64-64-32-10 ReLU MLP on ``(batch, 1, 8, 8)`` images (flattened first)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 32), nn.ReLU(),
        nn.Linear(32, NUM_CLASSES),
    )


def digits_cnn() -> nn.Module:
    """Tiny ReLU CNN on ``(batch, 1, 8, 8)``: conv 8@3x3 -> conv 16@3x3/2 -> 64 -> 10."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


#: Architecture name -> factory returning an untrained module.
ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
}


@lru_cache(maxsize=2)
def _load_bundle(path: str) -> dict[str, Any]:
    if not Path(path).exists():
        raise FileNotFoundError(f"bundled digits file {path} is missing; regenerate it with "
                                "`python scripts/make_bundled_model.py` (needs scikit-learn)")
    return torch.load(path, map_location="cpu", weights_only=True)


def bundle_info(path: str | Path = BUNDLE_PATH) -> dict[str, Any]:
    """The bundle's architecture name, metadata and number of samples (no tensors)."""
    bundle = _load_bundle(str(path))
    return {"arch": bundle["arch"], "num_samples": int(bundle["labels"].shape[0]), **dict(bundle["meta"])}


def load_digits_model(path: str | Path = BUNDLE_PATH) -> nn.Module:
    """A fresh copy of the bundled, naturally trained digits classifier, in eval mode.

    Input: ``(batch, 1, 8, 8)`` float images in ``[0, 1]``; output: ``(batch, 10)`` logits.
    """
    bundle = _load_bundle(str(path))
    model = ARCHITECTURES[bundle["arch"]]()
    model.load_state_dict(bundle["state_dict"])
    return model.eval()


def load_digits_samples(n: int | None = None, path: str | Path = BUNDLE_PATH) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (all when None) bundled test images and labels.

    Returns ``(images, labels)``: ``(n, 1, 8, 8)`` float32 in ``[0, 1]`` and ``(n,)`` int64.
    """
    bundle = _load_bundle(str(path))
    images, labels = bundle["images"], bundle["labels"]
    total = int(labels.shape[0])
    if n is None:
        n = total
    if not 0 < n <= total:
        raise ValueError(f"the bundle holds {total} samples; asked for {n}")
    return images[:n].clone(), labels[:n].clone()
