"""Certified robustness of sentiment classifiers to synonym substitutions.

The bundled LSTM and Transformer (:mod:`boundprop.data.sentiment`, trained on synthetic template
sentences) read word embeddings. Up to ``budget`` words of a sentence may be replaced by synonyms
(:class:`boundprop.PerturbationSynonym`, the perturbed input being the embedding tensor). For each
model and budget the script counts the test sentences verified robust by IBP, CROWN-IBP and CROWN
(the lower bound of ``z_label - z_other`` positive) and, since the sentences are short, the
sentences that really are robust, by enumerating every substitution (exact), then shows one
sentence with its bound and its worst substitution.

Usage: ``.venv/bin/python examples/synonym_perturbation.py [--n 40] [--budget 1 2]``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

import boundprop
from boundprop import PerturbationSynonym, compute_bounds
from boundprop.data.sentiment import SYNONYMS, decode, encode, load_sentiment_models, split, synonym_ids


def substitutions(sentence: str, budget: int) -> list[str]:
    """Every sentence reachable with at most ``budget`` synonym substitutions (the original first)."""
    words = sentence.split()
    options = [[w, *SYNONYMS.get(w, [])] for w in words]
    out = [sentence]
    positions = [i for i, o in enumerate(options) if len(o) > 1]
    for size in range(1, budget + 1):
        for chosen in itertools.combinations(positions, size):
            for subs in itertools.product(*[options[i][1:] for i in chosen]):
                new = list(words)
                for i, s in zip(chosen, subs):
                    new[i] = s
                out.append(" ".join(new))
    return out


def margin_spec(labels: torch.Tensor) -> torch.Tensor:
    """``C`` ``(batch, 1, 2)``: the row ``e_label - e_other``."""
    C = torch.zeros(len(labels), 1, 2)
    C[torch.arange(len(labels)), 0, labels] = 1.0
    C[torch.arange(len(labels)), 0, 1 - labels] = -1.0
    return C


@torch.no_grad()
def worst_substitution(model, embed, sentence: str, label: int, budget: int) -> tuple[float, str]:
    """The smallest margin over every substitution, and the sentence that attains it (exact)."""
    cands = substitutions(sentence, budget)
    logits = model(embed(encode(cands)))
    margins = logits[:, label] - logits[:, 1 - label]
    i = int(margins.argmin())
    return float(margins[i]), cands[i]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40, help="test sentences")
    p.add_argument("--budget", type=int, nargs="+", default=[1, 2])
    p.add_argument("--models", nargs="+", default=["lstm", "transformer"])
    p.add_argument("--methods", nargs="+", default=["IBP", "CROWN-IBP", "CROWN"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    bundle = load_sentiment_models()
    _, test = split()
    sentences, labels = [s for s, _ in test[:args.n]], torch.tensor([y for _, y in test[:args.n]])
    tokens = encode(sentences)
    x = bundle.embed(tokens)
    C = margin_spec(labels)
    print(f"{args.n} test sentences; up to `budget` words replaced by synonyms")
    print(f"{'model':12s} {'budget':>6s} {'accuracy':>8s} " + " ".join(f"{m + ' verified':>18s}" for m in args.methods)
          + f" {'truly robust':>12s} {'time':>6s}")
    rows = []
    for name in args.models:
        model = bundle.classifiers[name]
        graph = boundprop.capture(model, x[:2])
        with torch.no_grad():
            correct = model(x).argmax(-1) == labels
        for budget in args.budget:
            start = time.time()
            ptb = PerturbationSynonym.from_tokens(tokens, bundle.embedding, synonym_ids(), budget)
            verified, lowers = {}, {}
            with torch.no_grad():
                for method in args.methods:
                    res = compute_bounds(graph, (x,), {graph.inputs[0]: ptb}, method=method, C=C, upper=False)
                    lowers[method] = res.lower[:, 0]
                    verified[method] = int(((res.lower[:, 0] > 0) & correct).sum())
            worst = [worst_substitution(model, bundle.embed, s, int(y), budget) for s, y in zip(sentences, labels)]
            robust = int(sum(m > 0 for m, _ in worst))
            elapsed = time.time() - start
            rows.append({"model": name, "budget": budget, "n": args.n, "accuracy": int(correct.sum()),
                         "verified": verified, "robust": robust,
                         "lower": {m: v.tolist() for m, v in lowers.items()}, "worst": [m for m, _ in worst]})
            counts = " ".join(f"{verified[m]:18d}" for m in args.methods)
            print(f"{name:12s} {budget:6d} {int(correct.sum()):8d} " + counts
                  + f" {robust:12d} {elapsed:5.1f}s")
            if budget == max(args.budget):
                best = args.methods[-1]
                i = int(torch.tensor([m for m, _ in worst]).argmin())  # the least robust sentence
                print(f"    e.g. {decode(tokens[i:i + 1])[0]!r} (label {int(labels[i])}): margin bound by {best} "
                      f"{float(lowers[best][i]):.3f} <= worst substitution {worst[i][0]:.3f} ({worst[i][1]!r})")
    return {"rows": rows}


if __name__ == "__main__":
    main()
