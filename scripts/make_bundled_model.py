"""Regenerate src/boundprop/data/digits.pt: the bundled digits classifier and test samples.

Loads scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download), scales the
pixels (0..16) to [0, 1], splits train/test (stratified, fixed seed), trains a small ReLU network
naturally (cross-entropy, Adam, fixed seed, CPU, deterministic) and saves the architecture name,
the state dict, the first ``--samples`` test images with their labels and some metadata.

Usage: ``.venv/bin/python scripts/make_bundled_model.py [--arch digits_cnn] [--epochs 30]``.
scikit-learn is needed here only, never at run time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from boundprop.data.digits import ARCHITECTURES, BUNDLE_PATH  # noqa: E402


def load_split(seed: int, test_fraction: float) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # (n, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return tuple(torch.from_numpy(a) for a in (x_tr, y_tr, x_te, y_te))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="digits_cnn", choices=sorted(ARCHITECTURES))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--samples", type=int, default=100, help="test samples to bundle")
    p.add_argument("--out", type=Path, default=BUNDLE_PATH)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x_tr, y_tr, x_te, y_te = load_split(args.seed, args.test_fraction)

    model = ARCHITECTURES[args.arch]()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  train acc {accuracy(model, x_tr, y_tr):.4f}  "
                  f"test acc {accuracy(model, x_te, y_te):.4f}")

    model.eval()
    test_acc = accuracy(model, x_te, y_te)
    images, labels = x_te[:args.samples].clone(), y_te[:args.samples].clone()
    bundle = {
        "arch": args.arch,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "images": images,
        "labels": labels,
        "meta": {
            "dataset": "scikit-learn load_digits (8x8, pixels / 16)",
            "training": "natural (cross-entropy), Adam + cosine schedule",
            "epochs": args.epochs, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size,
            "train_size": len(y_tr), "test_size": len(y_te),
            "test_accuracy": round(test_acc, 4),
            "bundled_accuracy": round(accuracy(model, images, labels), 4),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bundle, args.out)
    size_kb = args.out.stat().st_size / 1024
    print(f"{args.arch}: test accuracy {test_acc:.4f} on {len(y_te)} images; wrote {args.out} ({size_kb:.0f} KiB) "
          f"with {len(labels)} samples")


if __name__ == "__main__":
    main()
