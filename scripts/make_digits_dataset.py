"""Regenerate src/boundprop/data/digits_full.npz: the whole 8x8 digits data set, compactly.

scikit-learn's ``load_digits`` (1797 images, pixels 0..16, shipped with scikit-learn, no download)
split exactly as ``scripts/make_bundled_model.py`` splits it (stratified, ``test_size=0.25``,
``random_state=0``), so that the 100 test images bundled in ``digits.pt`` are the first 100 test
images here and never appear in the training part. Stored as ``uint8`` pixels (0..16) and labels:
``x_train (1347, 8, 8)``, ``y_train``, ``x_test (450, 8, 8)``, ``y_test``. Loaded by
:func:`boundprop.training.data.load_digits_dataset`, which divides by 16 (inputs in ``[0, 1]``).

Usage: ``.venv/bin/python scripts/make_digits_dataset.py``. scikit-learn is needed here only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src" / "boundprop" / "data" / "digits_full.npz"


def main(argv: list[str] | None = None) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    digits = load_digits()
    x = digits.images.astype(np.uint8)  # 0..16
    y = digits.target.astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=args.test_fraction, random_state=args.seed, stratify=y)
    np.savez_compressed(args.out, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB): {len(y_tr)} train, {len(y_te)} test images")


if __name__ == "__main__":
    main()
