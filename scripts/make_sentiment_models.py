"""Regenerate src/boundprop/data/sentiment.pt: a word embedding and two small sentiment classifiers.

The data are the synthetic sentences of :mod:`boundprop.data.sentiment` (templates, no download),
split train/test with a fixed seed. First an embedding (``d = 8``) and the LSTM are trained
together (cross-entropy, Adam); then the Transformer is trained on the frozen embedding. The file
holds the embedding's and both classifiers' state dicts and a few metadata (accuracies, seed).

Usage: ``.venv/bin/python scripts/make_sentiment_models.py [--epochs 30]`` (a few seconds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from boundprop.data.sentiment import SENTIMENT_PATH, VOCAB, encode, make_classifiers, split  # noqa: E402


def accuracy(emb, model, tokens, labels) -> float:
    with torch.no_grad():
        return float((model(emb(tokens)).argmax(-1) == labels).float().mean())


def fit(emb, model, params, tokens, labels, epochs: int, lr: float, seed: int) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(emb(tokens[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=SENTIMENT_PATH)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train, test = split(args.seed)
    x_tr, y_tr = encode([s for s, _ in train]), torch.tensor([y for _, y in train])
    x_te, y_te = encode([s for s, _ in test]), torch.tensor([y for _, y in test])
    emb = nn.Embedding(len(VOCAB), args.d)
    with torch.no_grad():
        emb.weight.mul_(0.5)
    models = make_classifiers(args.d)
    meta = {"d": args.d, "seed": args.seed, "epochs": args.epochs, "train_size": len(train), "test_size": len(test),
            "data": "synthetic template sentences (boundprop.data.sentiment)"}
    fit(emb, models["lstm"], [*emb.parameters(), *models["lstm"].parameters()], x_tr, y_tr, args.epochs, 1e-2,
        args.seed)
    emb.requires_grad_(False)
    fit(emb, models["transformer"], list(models["transformer"].parameters()), x_tr, y_tr, args.epochs, 5e-3,
        args.seed)
    out = {"embedding": emb.state_dict(), "meta": meta}
    for name, model in models.items():
        model.eval()
        meta[f"{name}_test_accuracy"] = round(accuracy(emb, model, x_te, y_te), 4)
        out[name] = model.state_dict()
        print(f"{name}: test accuracy {meta[f'{name}_test_accuracy']:.4f}")
    torch.save(out, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
