"""A tiny synthetic sentiment task with a synonym table, and two small trained classifiers.

Everything is generated here, without downloads: sentences of at most :data:`MAX_LEN` words are
built from templates ("the movie was very good", "i did not like the plot", ...); the label is the
polarity of the sentiment word, flipped by "not". :data:`SYNONYMS` lists, for some words, words
of the same meaning and polarity that may replace them (the word-substitution perturbation of
:class:`boundprop.PerturbationSynonym`).

``scripts/make_sentiment_models.py`` trains an embedding (``d = 8``) with an LSTM and a
Transformer classifier (:class:`boundprop.zoo.TinyLSTM`, :class:`boundprop.zoo.TinyTransformer`)
and writes :data:`SENTIMENT_PATH`. The classifiers read the embeddings ``(batch, MAX_LEN, d)``
(sentences left-padded with ``<pad>``), so that the perturbed input of a bound computation is the
embedding tensor and the embedding lookup stays outside the captured graph::

    models = load_sentiment_models()
    tokens = encode(["the movie was very good"])
    x = models.embed(tokens)                                  # (1, MAX_LEN, d)
    ptb = PerturbationSynonym.from_tokens(tokens, models.embedding, synonym_ids(), budget=2)
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

SENTIMENT_PATH = Path(__file__).with_name("sentiment.pt")

MAX_LEN = 6
PAD = "<pad>"

_DET = ["the", "this", "that"]
_NOUN = ["movie", "film", "plot", "story", "acting", "ending", "cast"]
_BE = ["was", "is", "seemed"]
_INTENS = ["very", "really", "quite", "so", ""]
_POS_ADJ = ["good", "great", "nice", "fine", "excellent", "wonderful", "fun", "enjoyable"]
_NEG_ADJ = ["bad", "poor", "awful", "terrible", "horrible", "boring", "dull", "weak"]
_POS_VERB = ["liked", "loved", "enjoyed", "adored"]
_NEG_VERB = ["hated", "disliked", "despised"]
_ADV = ["really", "truly", ""]

#: Words that may replace a word (same meaning and polarity).
SYNONYMS: dict[str, list[str]] = {
    "movie": ["film"], "film": ["movie"], "plot": ["story"], "story": ["plot"],
    "was": ["seemed"], "is": ["seemed"], "seemed": ["was"],
    "very": ["really", "quite", "so"], "really": ["very", "truly"], "quite": ["very"], "so": ["very"],
    "truly": ["really"],
    "good": ["great", "nice", "fine"], "great": ["good", "excellent", "wonderful"], "nice": ["good", "fine"],
    "fine": ["good", "nice"], "excellent": ["great", "wonderful"], "wonderful": ["excellent", "great"],
    "fun": ["enjoyable"], "enjoyable": ["fun"],
    "bad": ["poor", "awful"], "poor": ["bad", "weak"], "awful": ["terrible", "horrible", "bad"],
    "terrible": ["awful", "horrible"], "horrible": ["terrible", "awful"], "boring": ["dull"], "dull": ["boring"],
    "weak": ["poor"],
    "liked": ["enjoyed", "loved"], "loved": ["adored", "liked"], "enjoyed": ["liked"], "adored": ["loved"],
    "hated": ["despised", "disliked"], "disliked": ["hated"], "despised": ["hated"],
}

#: The vocabulary: ``VOCAB[i]`` is the word of token id ``i`` (0 is padding).
VOCAB: list[str] = [PAD, "i", "did", "not", *_DET, *_NOUN, *_BE, *[w for w in _INTENS if w],
                    *_POS_ADJ, *_NEG_ADJ, *_POS_VERB, *_NEG_VERB, "truly"]
VOCAB = list(dict.fromkeys(VOCAB))
WORD_ID = {w: i for i, w in enumerate(VOCAB)}


def all_sentences() -> list[tuple[str, int]]:
    """Every sentence of the grammar with its label (1 positive, 0 negative)."""
    out = []
    for det, noun, be, intens, adj in itertools.product(_DET, _NOUN, _BE, _INTENS, _POS_ADJ + _NEG_ADJ):
        words = [det, noun, be] + ([intens] if intens else []) + [adj]
        out.append((" ".join(words), int(adj in _POS_ADJ)))
    for det, noun, be, adj in itertools.product(_DET, _NOUN, _BE, _POS_ADJ + _NEG_ADJ):
        out.append((f"{det} {noun} {be} not {adj}", int(adj in _NEG_ADJ)))
    for adv, verb, det, noun in itertools.product(_ADV, _POS_VERB + _NEG_VERB, _DET, _NOUN):
        words = ["i"] + ([adv] if adv else []) + [verb, det, noun]
        out.append((" ".join(words), int(verb in _POS_VERB)))
    for verb, det, noun in itertools.product(_POS_VERB + _NEG_VERB, _DET, _NOUN):
        out.append((f"i did not {verb} {det} {noun}", int(verb in _NEG_VERB)))
    return out


def encode(sentences: list[str]) -> torch.Tensor:
    """Token ids ``(batch, MAX_LEN)``, left-padded with 0."""
    rows = []
    for s in sentences:
        ids = [WORD_ID[w] for w in s.split()]
        if len(ids) > MAX_LEN:
            raise ValueError(f"{s!r} has more than {MAX_LEN} words")
        rows.append([0] * (MAX_LEN - len(ids)) + ids)
    return torch.tensor(rows, dtype=torch.long)


def decode(tokens: torch.Tensor) -> list[str]:
    return [" ".join(VOCAB[i] for i in row if i != 0) for row in tokens.tolist()]


def synonym_ids() -> dict[int, list[int]]:
    """:data:`SYNONYMS` as token ids (for :meth:`boundprop.PerturbationSynonym.from_tokens`)."""
    return {WORD_ID[w]: [WORD_ID[s] for s in subs] for w, subs in SYNONYMS.items()}


def split(seed: int = 0, test_fraction: float = 0.2) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A fixed random train/test split of :func:`all_sentences`."""
    data = all_sentences()
    random.Random(seed).shuffle(data)
    n_test = int(len(data) * test_fraction)
    return data[n_test:], data[:n_test]


def make_classifiers(d: int = 8) -> dict[str, nn.Module]:
    """Untrained classifiers on embeddings ``(batch, MAX_LEN, d)`` -> 2 logits (negative, positive)."""
    from ..zoo import TinyLSTM, TinyTransformer

    torch.manual_seed(0)
    return {"lstm": TinyLSTM(d, 8, 2), "transformer": TinyTransformer(d, 2, 16, 2, "relu")}


@dataclass
class SentimentModels:
    """The trained embedding (``(V, d)``) and classifiers (eval mode), with the bundle's metadata."""

    embedding: nn.Embedding
    classifiers: dict[str, nn.Module]
    meta: dict

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embedding(tokens)


@lru_cache(maxsize=1)
def _load(path: str) -> dict:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python scripts/make_sentiment_models.py`")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_sentiment_models(path: str | Path = SENTIMENT_PATH) -> SentimentModels:
    """Fresh copies of the bundled trained embedding, LSTM and Transformer."""
    bundle = _load(str(path))
    emb = nn.Embedding(len(VOCAB), bundle["meta"]["d"])
    emb.load_state_dict(bundle["embedding"])
    classifiers = make_classifiers(bundle["meta"]["d"])
    for name, model in classifiers.items():
        model.load_state_dict(bundle[name])
        model.eval()
    return SentimentModels(emb.eval(), classifiers, dict(bundle["meta"]))


__all__ = ["MAX_LEN", "PAD", "SENTIMENT_PATH", "SYNONYMS", "VOCAB", "WORD_ID", "SentimentModels", "all_sentences",
           "decode", "encode", "load_sentiment_models", "make_classifiers", "split", "synonym_ids"]
