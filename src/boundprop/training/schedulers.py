"""Perturbation-radius (eps) schedules for certified training.

A schedule maps the training position (epoch, 1-based; batch within the epoch, 1-based) to the
eps of that batch; it is a pure function of the position, so resuming from a checkpoint needs
nothing but the position. The ramp starts after epoch ``start - 1`` (epochs before ``start`` are
warm-up epochs with ``eps = 0``, trained on the natural loss only) and reaches ``max_eps`` at the
end of epoch ``start + length - 1``; eps is updated every batch. These are auto_LiRPA's
``eps_scheduler`` semantics:

* :class:`FixedScheduler`: ``max_eps`` from epoch ``start`` on (0 before).
* :class:`LinearScheduler`: a linear ramp.
* :class:`SmoothedScheduler` (the IBP / CROWN-IBP papers' schedule): with ``t`` the batch count
  since the ramp began, ``T`` the ramp's length in batches and ``t_mid = floor(mid * T)``, a
  polynomial ``a t^beta`` up to ``t_mid`` (slow, "exponential-looking" growth), then a straight
  line to ``max_eps`` at ``T``, with ``a`` chosen so that value and slope agree at ``t_mid``::

      a = max_eps / ((T - t_mid) beta t_mid^(beta-1) + t_mid^beta)

The auto_LiRPA-style stateful interface is also there: ``set_epoch_length(n)``,
``step_epoch()``, ``step_batch()``, ``get_eps()``, ``get_max_eps()``, ``train()``/``eval()``
(in eval mode ``get_eps`` gives ``max_eps``), ``state_dict()``/``load_state_dict()``.
"""

from __future__ import annotations

from typing import Any


class EpsScheduler:
    """Base class: subclasses define :meth:`ramp` (the value ``t`` batches into a ``T``-batch ramp)."""

    kind = "base"

    def __init__(self, max_eps: float, start: int = 1, length: int = 1, epoch_length: int = 1) -> None:
        if max_eps < 0:
            raise ValueError(f"max_eps must be >= 0, got {max_eps}")
        if start < 1:
            raise ValueError(f"start is a 1-based epoch, got {start}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.max_eps = float(max_eps)
        self.start = int(start)
        self.length = int(length)
        self.epoch_length = max(1, int(epoch_length))
        self.epoch = 0
        self.batch = 0
        self.is_training = True

    # -- the pure schedule ---------------------------------------------------------------------
    def value(self, epoch: int, batch: int) -> float:
        """eps at batch ``batch`` (1-based) of epoch ``epoch`` (1-based)."""
        if epoch < self.start:
            return 0.0
        total = self.length * self.epoch_length
        step = (epoch - self.start) * self.epoch_length + batch  # batches since the ramp began, >= 1
        if total <= 0 or step >= total:
            return self.max_eps
        return min(self.max_eps, max(0.0, self.ramp(step, total)))

    def ramp(self, step: int, total: int) -> float:
        raise NotImplementedError

    def is_warmup(self, epoch: int) -> bool:
        return epoch < self.start

    def end_epoch(self) -> int:
        """The first epoch trained at ``max_eps`` throughout."""
        return self.start + self.length

    # -- auto_LiRPA's stateful interface --------------------------------------------------------
    def set_epoch_length(self, n: int) -> None:
        self.epoch_length = max(1, int(n))

    def step_epoch(self) -> None:
        self.epoch += 1
        self.batch = 0

    def step_batch(self) -> None:
        self.batch += 1

    def get_eps(self) -> float:
        if not self.is_training:
            return self.max_eps
        return self.value(max(self.epoch, 1), max(self.batch, 1))

    def get_max_eps(self) -> float:
        return self.max_eps

    def train(self) -> None:
        self.is_training = True

    def eval(self) -> None:
        self.is_training = False

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_eps": self.max_eps, "start": self.start, "length": self.length,
                "epoch_length": self.epoch_length, "epoch": self.epoch, "batch": self.batch, **self._extra()}

    def _extra(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("max_eps", "start", "length", "epoch_length", "epoch", "batch", *self._extra()):
            if key in state:
                setattr(self, key, state[key])

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self._extra().items())
        return f"{type(self).__name__}(max_eps={self.max_eps}, start={self.start}, length={self.length}{extra})"


class FixedScheduler(EpsScheduler):
    """``max_eps`` from epoch ``start`` on."""

    kind = "fixed"

    def __init__(self, max_eps: float, start: int = 1, epoch_length: int = 1) -> None:
        super().__init__(max_eps, start, 0, epoch_length)

    def ramp(self, step: int, total: int) -> float:
        return self.max_eps


class LinearScheduler(EpsScheduler):
    """``max_eps * t / T``."""

    kind = "linear"

    def ramp(self, step: int, total: int) -> float:
        return self.max_eps * step / total


class SmoothedScheduler(EpsScheduler):
    """Polynomial (power ``beta``) growth up to ``mid`` of the ramp, then linear (module docstring)."""

    kind = "smoothed"

    def __init__(self, max_eps: float, start: int = 1, length: int = 1, mid: float = 0.25, beta: float = 4.0,
                 epoch_length: int = 1) -> None:
        if beta < 2:
            raise ValueError(f"beta must be >= 2, got {beta}")
        if not 0.0 <= mid <= 1.0:
            raise ValueError(f"mid must lie in [0, 1], got {mid}")
        super().__init__(max_eps, start, length, epoch_length)
        self.mid = float(mid)
        self.beta = float(beta)

    def _extra(self) -> dict[str, Any]:
        return {"mid": self.mid, "beta": self.beta}

    def ramp(self, step: int, total: int) -> float:
        mid_step = int(total * self.mid)
        if mid_step <= 0:
            return self.max_eps * step / total
        t = float(mid_step) ** (self.beta - 1.0)
        a = self.max_eps / ((total - mid_step) * self.beta * t + mid_step * t)
        if step < mid_step:
            return a * float(step) ** self.beta
        mid_value = a * float(mid_step) ** self.beta
        if total == mid_step:
            return self.max_eps
        return mid_value + (self.max_eps - mid_value) * (step - mid_step) / (total - mid_step)


SCHEDULES = {"fixed": FixedScheduler, "linear": LinearScheduler, "smoothed": SmoothedScheduler}


def make_scheduler(kind: str, max_eps: float, start: int = 1, length: int = 1, epoch_length: int = 1,
                   **kw: Any) -> EpsScheduler:
    """A scheduler by name: ``fixed``, ``linear`` or ``smoothed`` (``mid``, ``beta`` keywords)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown eps schedule {kind!r}; choose one of {sorted(SCHEDULES)}")
    if kind == "fixed":
        return FixedScheduler(max_eps, start, epoch_length)
    if kind == "linear":
        return LinearScheduler(max_eps, start, length, epoch_length)
    return SmoothedScheduler(max_eps, start, length, epoch_length=epoch_length, **kw)


def scheduler_from_state(state: dict[str, Any]) -> EpsScheduler:
    sched = make_scheduler(state["kind"], state["max_eps"], state["start"], max(state["length"], 0),
                           state["epoch_length"], **({"mid": state["mid"], "beta": state["beta"]}
                                                     if state["kind"] == "smoothed" else {}))
    sched.load_state_dict(state)
    return sched


__all__ = ["EpsScheduler", "FixedScheduler", "LinearScheduler", "SCHEDULES", "SmoothedScheduler", "make_scheduler",
           "scheduler_from_state"]
