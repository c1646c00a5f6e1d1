"""PerturbationSynonym: exact concretisation and whole-model soundness, checked by enumerating substitutions."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import boundprop
from boundprop import PerturbationSynonym, compute_bounds
from boundprop.data.sentiment import (
    MAX_LEN,
    SYNONYMS,
    VOCAB,
    WORD_ID,
    all_sentences,
    encode,
    load_sentiment_models,
    synonym_ids,
)

ROOT = Path(__file__).resolve().parents[1]


def enumerate_inputs(x, cands, mask, budget, eps):
    """Every input of the set for one sentence: ``x`` ``(T, d)``, ``cands`` ``(T, K, d)``, ``mask`` ``(T, K)``."""
    T = x.shape[0]
    out = [x]
    for size in range(1, budget + 1):
        for positions in itertools.combinations(range(T), size):
            choices = [[k for k in range(cands.shape[1]) if mask[t, k]] for t in positions]
            for picks in itertools.product(*choices):
                xp = x.clone()
                for t, k in zip(positions, picks):
                    xp[t] = x[t] + eps * (cands[t, k] - x[t])
                out.append(xp)
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 4), K=st.integers(1, 3), budget=st.integers(0, 4),
       eps=st.sampled_from([1.0, 0.5]), use_simple=st.booleans())
def test_concretize_equals_enumeration(seed, T, K, budget, eps, use_simple):
    gen = torch.Generator().manual_seed(seed)
    d = 3
    x = torch.randn(2, T, d, generator=gen, dtype=torch.float64)
    cands = torch.randn(2, T, K, d, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, T, K, generator=gen) < 0.7
    A = torch.randn(2, 3, T, d, generator=gen, dtype=torch.float64)
    ptb = PerturbationSynonym(budget, eps, use_simple=use_simple, candidates=cands, mask=mask)
    box = ptb.interval(x)
    for b in range(2):
        pts = enumerate_inputs(x[b], cands[b], mask[b], budget, eps)
        vals = torch.einsum("std,ntd->ns", A[b], pts)
        assert (box.lower[b] <= pts + 1e-12).all() and (box.upper[b] >= pts - 1e-12).all()
        low, up = ptb.concretize(x, A, -1)[b], ptb.concretize(x, A, +1)[b]
        if use_simple:  # the box hull: sound, not exact
            assert (low <= vals.amin(0) + 1e-9).all() and (up >= vals.amax(0) - 1e-9).all()
        else:
            assert torch.allclose(low, vals.amin(0), atol=1e-9) and torch.allclose(up, vals.amax(0), atol=1e-9)


def test_from_tokens_builds_candidates():
    emb = torch.nn.Embedding(len(VOCAB), 4)
    tokens = encode(["the movie was good", "i hated the plot"])
    ptb = PerturbationSynonym.from_tokens(tokens, emb, synonym_ids(), budget=1)
    assert ptb.candidates.shape[:2] == (2, MAX_LEN) and ptb.mask.shape == ptb.candidates.shape[:3]
    for b, sentence in enumerate(["the movie was good", "i hated the plot"]):
        words = ["<pad>"] * (MAX_LEN - len(sentence.split())) + sentence.split()
        for t, w in enumerate(words):
            subs = SYNONYMS.get(w, [])
            assert int(ptb.mask[b, t].sum()) == len(subs)
            for k, s in enumerate(subs):
                assert torch.equal(ptb.candidates[b, t, k], emb.weight[WORD_ID[s]].detach())
    with pytest.raises(RuntimeError):
        PerturbationSynonym(1).interval(torch.zeros(1, 2, 3))


@pytest.fixture(scope="module")
def sentiment():
    bundle = load_sentiment_models()
    sentences = ["the movie was very good", "i did not like the plot".replace("like", "liked"),
                 "this film is not bad", "that story seemed so dull"]
    tokens = encode(sentences)
    x = bundle.embed(tokens)
    graphs = {name: boundprop.capture(model, x[:2]) for name, model in bundle.classifiers.items()}
    return bundle, tokens, x, graphs


@pytest.mark.parametrize("name,budget,eps", [("lstm", 1, 1.0), ("lstm", 2, 1.0), ("lstm", 3, 0.5),
                                             ("transformer", 1, 1.0), ("transformer", 2, 0.5)])
def test_model_bounds_sound_by_enumeration(sentiment, name, budget, eps):
    bundle, tokens, x, graphs = sentiment
    model, g = bundle.classifiers[name], graphs[name]
    ptb = PerturbationSynonym.from_tokens(tokens, bundle.embedding, synonym_ids(), budget, eps)
    methods = ("IBP", "CROWN-IBP", "CROWN") + (("forward",) if (name, budget) == ("lstm", 1) else ())
    with torch.no_grad():
        results = {m: compute_bounds(g, (x,), {g.inputs[0]: ptb}, method=m) for m in methods}
        for b in range(x.shape[0]):
            pts = enumerate_inputs(x[b], ptb.candidates[b], ptb.mask[b], budget, eps)
            y = model(pts)
            for m, r in results.items():
                assert (r.lower[b] <= y + 1e-4).all(), (m, b)
                assert (r.upper[b] >= y - 1e-4).all(), (m, b)
    crown, ibp = results["CROWN"], results["IBP"]
    assert (crown.upper - crown.lower).mean() <= (ibp.upper - ibp.lower).mean() + 1e-6


def test_budget_zero_is_the_point_and_budget_tightens(sentiment):
    bundle, tokens, x, graphs = sentiment
    g, model = graphs["lstm"], bundle.classifiers["lstm"]
    with torch.no_grad():
        y = model(x)
        zero = compute_bounds(g, (x,), {g.inputs[0]: PerturbationSynonym.from_tokens(
            tokens, bundle.embedding, synonym_ids(), 0)}, method="CROWN-IBP")
        assert torch.allclose(zero.lower, y, atol=1e-5) and torch.allclose(zero.upper, y, atol=1e-5)
        widths = []
        for budget in (1, 3):
            r = compute_bounds(g, (x,), {g.inputs[0]: PerturbationSynonym.from_tokens(
                tokens, bundle.embedding, synonym_ids(), budget)}, method="CROWN")
            widths.append(float((r.upper - r.lower).mean()))
    assert widths[0] < widths[1]


def test_bundled_models_are_accurate():
    bundle = load_sentiment_models()
    assert bundle.meta["lstm_test_accuracy"] > 0.95 and bundle.meta["transformer_test_accuracy"] > 0.95
    data = all_sentences()
    assert all(len(s.split()) <= MAX_LEN for s, _ in data)
    for word, subs in SYNONYMS.items():  # every synonym is in the vocabulary
        assert word in WORD_ID and all(s in WORD_ID for s in subs)


def test_example_runs():
    spec = importlib.util.spec_from_file_location("synonym_example", ROOT / "examples" / "synonym_perturbation.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--n", "4", "--budget", "1", "--models", "transformer", "--methods", "IBP", "CROWN"])
    (row,) = report["rows"]
    assert row["verified"]["CROWN"] <= row["robust"]  # verified sentences are truly robust
    for lower, worst in zip(row["lower"]["CROWN"], row["worst"]):
        assert lower <= worst + 1e-4
