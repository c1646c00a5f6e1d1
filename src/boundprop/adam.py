"""Adam for bound optimisation (alpha-CROWN, the verifier's beta-CROWN), without ``torch.optim``.

``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
``p <- p - lr (m / (1 - b1^t)) / (sqrt((v + 1e-30) / (1 - b2^t)) + eps)`` (Kingma and Ba; the
1e-30 is explained in :meth:`Adam.step`), with NaN and infinite gradient entries taken as 0.
"""

from __future__ import annotations

import torch

#: added to the second moment under the square root (see :meth:`Adam.step`)
TINY = 1e-30


class Adam:
    """Adam (Kingma and Ba) without torch.optim (the first torch.optim.Adam of a process takes about
    1.5 s to construct here). ``lr`` may be changed between steps (a decay schedule)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = [], lr, betas, eps
        self.m: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.t = 0
        self.add(params)

    def add(self, params: list[torch.Tensor]) -> None:
        """More parameters, with fresh moments (stepped with the others' step count)."""
        self.params += params
        self.m += [torch.zeros_like(p) for p in params]
        self.v += [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g = torch.nan_to_num(g, 0.0, 0.0, 0.0)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            # sqrt(v / c2) as sqrt(v + tiny) / sqrt(c2): one temporary, updated in place. The tiny
            # term (sqrt: 1e-15, far below eps) matters on CPU, where sqrt of an exact 0 takes about
            # 10 times as long as of any other number, and v is 0 wherever a gradient always was
            denom = v.add(TINY).sqrt_().div_(c2 ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)
