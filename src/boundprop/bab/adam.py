"""Adam for the verifier's bound optimisation, without ``torch.optim``.

``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
``p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` (Kingma and Ba), with NaN and
infinite gradient entries taken as 0.
"""

from __future__ import annotations

import torch


class Adam:
    """Adam (Kingma and Ba) without torch.optim (whose first import costs seconds)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g = torch.nan_to_num(g, 0.0, 0.0, 0.0)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(self.lr * (m / c1) / ((v / c2).sqrt() + self.eps))
