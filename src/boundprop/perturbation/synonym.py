"""Word substitutions: each of at most ``budget`` positions of a sentence may take a synonym.

The perturbed input is the embedding tensor ``x`` (``(batch, T, d)``) that an embedding-based
model (LSTM, Transformer) reads; the perturbation knows, for every position ``t``, up to ``K``
candidate substitute embeddings ``c[b, t, k]`` (``mask[b, t, k]`` marks the real ones)::

    S = { x' : x'_t = x_t + eps (c_tk - x_t) for some k at at most `budget` positions t,
               x'_t = x_t at all others }

``eps`` in [0, 1] interpolates between the original and the substituted embeddings (auto_LiRPA
uses it to ramp the perturbation up during training; ``eps = 1`` is the real substitution set).

**Concretisation** (exact): substituting position ``t`` alone changes ``a . x`` by
``d_t = min_k eps a_t . (c_tk - x_t)`` at best (lower bound); positions are independent and the
budget counts positions, so the dynamic programme over positions with at most ``budget``
substitutions (``best(t, j) = min(best(t-1, j), best(t-1, j-1) + d_t)``) has the closed solution
"the ``budget`` most negative ``d_t``", computed with one ``topk`` per row of ``A``.

**Interval**: the per-position box hull of the original and candidate embeddings (every position
may change, so IBP ignores the budget; the first affine layer is bounded through
:meth:`concretize`, as the engine treats the set as a non-box ball).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..domains import Interval
from .lp import Perturbation


class PerturbationSynonym(Perturbation):
    """At most ``budget`` word substitutions in a sentence of embeddings ``(batch, T, d)``.

    Arguments:
        budget: the number of positions that may be substituted.
        eps: interpolation between the original (0) and substituted (1) embeddings.
        use_simple: concretise through the interval (the box hull, no budget): cheaper, looser.
        candidates: ``(batch, T, K, d)`` substitute embeddings (or set later, :meth:`set_candidates`,
            or built from token ids, :meth:`from_tokens`).
        mask: ``(batch, T, K)`` booleans, True for real candidates (default: all).
    """

    #: marks the set as a non-box ball for IBP (the first affine layer is bounded through concretize)
    norm = 0.0

    def __init__(self, budget: int, eps: float = 1.0, use_simple: bool = False,
                 candidates: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.budget = int(budget)
        self.eps = float(eps)
        self.use_simple = use_simple
        self.candidates: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        if candidates is not None:
            self.set_candidates(candidates, mask)

    def __repr__(self) -> str:
        k = None if self.candidates is None else self.candidates.shape[2]
        return f"PerturbationSynonym(budget={self.budget}, eps={self.eps}, candidates per position={k})"

    def _box_only(self) -> bool:
        return False

    def set_candidates(self, candidates: torch.Tensor, mask: torch.Tensor | None = None) -> PerturbationSynonym:
        """Give the substitutes: ``candidates`` ``(batch, T, K, d)``, ``mask`` ``(batch, T, K)``."""
        if candidates.dim() != 4:
            raise ValueError(f"candidates must be (batch, T, K, d), got shape {tuple(candidates.shape)}")
        if mask is None:
            mask = torch.ones(candidates.shape[:3], dtype=torch.bool, device=candidates.device)
        if mask.shape != candidates.shape[:3]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match candidates {tuple(candidates.shape)}")
        self.candidates, self.mask = candidates, mask.bool()
        return self

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, embedding: torch.Tensor | torch.nn.Embedding,
                    synonyms: Mapping[int, Sequence[int]], budget: int, eps: float = 1.0,
                    max_candidates: int | None = None) -> PerturbationSynonym:
        """Candidates from token ids ``(batch, T)``, an embedding matrix ``(V, d)`` and a synonym table.

        ``synonyms[token]`` lists the token ids that may replace ``token`` (the token itself and
        duplicates are skipped); ``max_candidates`` keeps the first ones only.
        """
        weight = embedding.weight if isinstance(embedding, torch.nn.Embedding) else embedding
        weight = weight.detach()
        rows = []
        for sentence in tokens.tolist():
            rows.append([[s for s in dict.fromkeys(synonyms.get(tok, ())) if s != tok][:max_candidates]
                         for tok in sentence])
        K = max(1, max((len(c) for row in rows for c in row), default=1))
        ids = torch.zeros(tokens.shape[0], tokens.shape[1], K, dtype=torch.long, device="cpu")  # built on the host
        mask = torch.zeros(tokens.shape[0], tokens.shape[1], K, dtype=torch.bool, device="cpu")
        for b, row in enumerate(rows):
            for t, cands in enumerate(row):
                ids[b, t, :len(cands)] = torch.tensor(cands, dtype=torch.long, device="cpu")
                mask[b, t, :len(cands)] = True
        return cls(budget, eps, candidates=weight[ids.to(weight.device)], mask=mask.to(weight.device))

    def _substitutes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.candidates is None:
            raise RuntimeError("PerturbationSynonym needs candidates: set_candidates(...) or from_tokens(...)")
        if x.dim() != 3 or self.candidates.shape[:2] != x.shape[:2] or self.candidates.shape[3] != x.shape[2]:
            raise ValueError(f"input {tuple(x.shape)} does not match candidates {tuple(self.candidates.shape)}")
        cand = self.candidates.to(x)
        return x.unsqueeze(2) + self.eps * (cand - x.unsqueeze(2)), self.mask.to(x.device)

    def interval(self, x: torch.Tensor) -> Interval:
        if self.budget == 0:
            return Interval(x, x)
        subs, mask = self._substitutes(x)
        big = torch.finfo(x.dtype).max
        m = mask.unsqueeze(-1)
        lower = torch.minimum(x, torch.where(m, subs, big).amin(2))
        upper = torch.maximum(x, torch.where(m, subs, -big).amax(2))
        return Interval(lower, upper)

    def concretize(self, x: torch.Tensor, A: torch.Tensor, sign: int) -> torch.Tensor:
        """``A`` ``(batch or 1, spec, T, d)`` -> the min (``sign=-1``) / max of ``A . x'`` over the set."""
        batch = x.shape[0]
        A = A.expand(batch, *A.shape[1:]) if A.shape[0] != batch else A
        base = torch.einsum("bstd,btd->bs", A, x)
        if self.budget == 0:
            return base
        if self.use_simple:
            box = self.interval(x)
            A_flat = A.reshape(batch, A.shape[1], -1)
            return (A_flat @ box.center.reshape(batch, -1, 1)).squeeze(-1) + sign * (
                A_flat.abs() @ box.radius.reshape(batch, -1, 1)).squeeze(-1)
        subs, mask = self._substitutes(x)
        change = torch.einsum("bstd,btkd->bstk", A, subs - x.unsqueeze(2))  # (batch, spec, T, K)
        valid = mask.unsqueeze(1)
        zero = torch.zeros((), dtype=change.dtype, device=change.device)
        if sign < 0:
            best = torch.where(valid, change, zero).amin(-1).clamp(max=0)  # (batch, spec, T)
            k = min(self.budget, best.shape[-1])
            return base - (-best).topk(k, dim=-1).values.sum(-1)
        best = torch.where(valid, change, zero).amax(-1).clamp(min=0)
        k = min(self.budget, best.shape[-1])
        return base + best.topk(k, dim=-1).values.sum(-1)
