"""The training loop: natural, PGD-adversarial, IBP, CROWN-IBP and CROWN training.

Usage::

    from boundprop.training import TrainConfig, train
    result = train(model, train_data, test_data, TrainConfig(method="crown-ibp", eps=0.1, epochs=20,
                                                             out_dir="runs/digits"))
    result.history[-1]["verified_err_ibp"]

Per batch (``eps`` from the schedule, ``r = eps / max_eps``):

* warm-up (``eps == 0``, the epochs before the ramp): natural cross-entropy only;
* ``natural``: cross-entropy; ``pgd``: cross-entropy at PGD points (radius ``eps``);
* ``ibp`` / ``crown-ibp`` / ``crown``: ``kappa CE + (1 - kappa) robust CE`` with
  ``kappa = kappa_start + (kappa_end - kappa_start) r``; for CROWN-IBP the bounds mix CROWN-IBP and
  IBP with ``beta = beta_start + (beta_end - beta_start) r`` (:mod:`.losses`).

Loss fusion (:mod:`.fusion`) is used for IBP / CROWN-IBP / CROWN when ``loss_fusion`` is True, or
``"auto"`` and the number of classes is at least :data:`FUSION_MIN_CLASSES`; otherwise the margin
specification.

Every epoch: evaluation on the test data at ``eval_eps`` (clean, PGD and verified errors), a
progress display (tqdm when installed, else printed lines), a checkpoint (model, optimiser,
learning-rate schedule, eps schedule, epoch, history) that :meth:`Trainer.fit` resumes from, and,
at the end, ``metrics.json``, ``training.png`` (matplotlib, when installed) and a table.

Reproducibility: the data order of epoch ``e`` and the PGD random starts of each batch come from
generators seeded by ``(seed, e, batch)``, so a resumed run equals an uninterrupted one, and a run
on several processes (:mod:`.distributed`; each process takes a slice of every global batch and
the per-sample losses are scaled so that the averaged gradient is the global batch's) equals the
single-process run up to floating-point summation order.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..devices import module_device, resolve_device
from ..syncs import may_read
from .evaluation import evaluate
from .losses import METHODS, ROBUST_METHODS, BoundGraphs, capture_graphs, pgd_attack, robust_ce
from .models import set_train_mode
from .schedulers import EpsScheduler, make_scheduler

#: ``loss_fusion="auto"`` fuses from this many classes on (below, the margin specification is as
#: fast and its CROWN-IBP bounds are tighter; see benchmarks/results/training.md).
FUSION_MIN_CLASSES = 32
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Settings of one training run (all plain values: saved in checkpoints and metrics.json)."""

    method: str = "crown-ibp"  #: natural | pgd | ibp | crown-ibp | crown
    eps: float = 0.1  #: the largest training eps (the end of the schedule)
    eval_eps: float | None = None  #: eps of the evaluation (default: ``eps``)
    norm: float = math.inf
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"  #: adam | sgd (momentum 0.9)
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = ()  #: epochs after which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.1
    schedule: str = "smoothed"  #: fixed | linear | smoothed
    warmup_epochs: int = 1  #: natural epochs (eps = 0) before the ramp
    ramp_epochs: int | None = None  #: epochs of the ramp (default: half of the epochs after warm-up)
    schedule_mid: float = 0.25
    schedule_beta: float = 4.0
    kappa_start: float = 1.0
    kappa_end: float = 0.0
    beta_start: float = 1.0
    beta_end: float = 0.0
    loss_fusion: bool | str = "auto"  #: True, False or "auto"
    grad_clip: float | None = 10.0  #: max gradient norm (None: no clipping)
    pgd_steps: int = 7  #: PGD steps for PGD training
    clip_min: float | None = 0.0  #: input domain (the perturbation is intersected with it)
    clip_max: float | None = 1.0
    eval_methods: tuple[str, ...] = ("ibp", "crown")
    eval_pgd_steps: int = 10
    eval_every: int = 1
    eval_limit: int | None = None  #: evaluate on the first samples only
    eval_batch_size: int = 256
    seed: int = 0
    out_dir: str | None = None
    progress: bool = True
    print_every: int = 0  #: batches between printed progress lines without tqdm (0: about 4 per epoch)
    threads: int | None = None
    #: cpu, cuda, cuda:N or auto (CUDA when available); None: where the model is. One process per device
    device: str | None = None

    def __post_init__(self) -> None:
        self.method = self.method.lower()
        if self.method not in METHODS:
            raise ValueError(f"unknown training method {self.method!r}; choose one of {METHODS}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.loss_fusion not in (True, False, "auto"):
            raise ValueError(f"loss_fusion must be True, False or 'auto', got {self.loss_fusion!r}")
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        self.eval_methods = tuple(m.lower() for m in self.eval_methods)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["norm"] = "inf" if math.isinf(self.norm) else self.norm
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if data.get("norm") == "inf":
            data["norm"] = math.inf
        for key in ("lr_milestones", "eval_methods"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    @property
    def target_eval_eps(self) -> float:
        return self.eps if self.eval_eps is None else self.eval_eps


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: per-epoch history (dicts) and the final evaluation."""

    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    out_dir: str | None = None


class LossModule(nn.Module):
    """Per-batch training loss as a module (what DistributedDataParallel wraps).

    ``forward(x, y, eps, kappa, beta, noise, scale)`` returns ``(loss, nat_ce, robust, correct)``:
    ``loss = scale * sum_i loss_i`` (``scale = world / global batch``: the averaged gradient is the
    global batch mean's), and detached per-sample statistics.
    """

    def __init__(self, model: nn.Module, graphs: BoundGraphs | None, config: TrainConfig, num_classes: int,
                 fusion: bool) -> None:
        super().__init__()
        self.model = model
        self.graphs = graphs
        self.config = config
        self.num_classes = num_classes
        self.fusion = fusion

    def forward(self, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float, beta: float,
                noise: torch.Tensor | None, scale: float):
        cfg = self.config
        robust = x.new_full((x.shape[0],), float("nan"))
        if cfg.method == "pgd" and eps > 0:
            adv = pgd_attack(self.model, x, y, eps, cfg.pgd_steps, clip_min=cfg.clip_min, clip_max=cfg.clip_max,
                             noise=noise)
            logits = self.model(adv)
            per_sample = F.cross_entropy(logits, y, reduction="none")
            robust = per_sample.detach()
            logits = logits.detach()
        else:
            logits = self.model(x)
            per_sample = F.cross_entropy(logits, y, reduction="none")
        nat = per_sample.detach()
        if cfg.method in ROBUST_METHODS and eps > 0:
            rob = robust_ce(self.graphs, x, y, eps, cfg.method, self.num_classes, beta=beta, fusion=self.fusion,
                            norm=cfg.norm, clip_min=cfg.clip_min, clip_max=cfg.clip_max)
            robust = rob.detach()
            per_sample = kappa * per_sample + (1.0 - kappa) * rob
        correct = (logits.argmax(-1) == y).float()
        return per_sample.sum() * scale, nat, robust, correct


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # optional
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


class Trainer:
    """Trains ``model`` on ``train_data`` (a Dataset of ``(x, label)``), evaluating on ``test_data``.

    ``rank``/``world_size``: this process's place in a multi-process run (see
    :mod:`boundprop.training.distributed`; the process group must be initialised). Only rank 0
    evaluates, prints and writes files.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, test_data: Dataset | None, config: TrainConfig,
                 num_classes: int | None = None, rank: int = 0, world_size: int = 1,
                 log: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.train_data = train_data
        self.test_data = test_data
        self.config = cfg = config
        self.rank, self.world_size = rank, world_size
        self.log = log or (lambda msg: print(msg, flush=True))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device, module_device(model))
        if world_size > 1 and self.device.type != "cpu":
            raise ValueError("multi-process training runs on the CPU (gloo): use device='cpu'")
        model.to(self.device)
        # the training set is kept whole on the device (batches are index slices of it)
        self.x_all, self.y_all = (t.to(self.device) for t in _tensors(train_data))
        self.num_classes = num_classes or int(self.y_all.max()) + 1
        self.fusion = cfg.method in ROBUST_METHODS and (
            cfg.loss_fusion is True or (cfg.loss_fusion == "auto" and self.num_classes >= FUSION_MIN_CLASSES))
        self.batches_per_epoch = math.ceil(len(self.y_all) / cfg.batch_size)
        ramp = cfg.ramp_epochs if cfg.ramp_epochs is not None else max(1, (cfg.epochs - cfg.warmup_epochs) // 2)
        self.eps_scheduler: EpsScheduler = make_scheduler(
            cfg.schedule, cfg.eps, start=cfg.warmup_epochs + 1, length=ramp, epoch_length=self.batches_per_epoch,
            **({"mid": cfg.schedule_mid, "beta": cfg.schedule_beta} if cfg.schedule == "smoothed" else {}))
        set_train_mode(model)
        graphs = None
        if cfg.method in ROBUST_METHODS:
            graphs = capture_graphs(model, self.x_all[:2], self.fusion)
        self.graphs = graphs
        self.eval_graph = graphs.plain if graphs is not None else None
        self.loss_module = LossModule(model, graphs, cfg, self.num_classes, self.fusion)
        self.step_module: nn.Module = self.loss_module
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = DistributedDataParallel(self.loss_module)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adam, sgd)")
        self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.lr_milestones),
                                                                 cfg.lr_gamma)
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None

    # -- schedule values -----------------------------------------------------------------------
    def eps_at(self, epoch: int, batch: int) -> float:
        return self.eps_scheduler.value(epoch, batch)

    def mixing(self, eps: float) -> tuple[float, float]:
        """``(kappa, beta)`` at ``eps``."""
        cfg = self.config
        r = 0.0 if cfg.eps <= 0 else min(1.0, eps / cfg.eps)
        return (cfg.kappa_start + (cfg.kappa_end - cfg.kappa_start) * r,
                cfg.beta_start + (cfg.beta_end - cfg.beta_start) * r)

    # -- one epoch -----------------------------------------------------------------------------
    def _generator(self, *key: int) -> torch.Generator:
        seed = self.config.seed
        for k in key:
            seed = (seed * 1_000_003 + k + 1) % (2**62)
        return torch.Generator().manual_seed(seed)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` (1-based); returns its training statistics."""
        cfg = self.config
        set_train_mode(self.model)
        n = len(self.y_all)
        # drawn on the CPU (where the generator is), so runs are reproducible on any device
        perm = torch.randperm(n, generator=self._generator(epoch), device="cpu").to(self.device)
        sums = None  # the epoch's sums so far (see _batch_sums), on the device: read only to report
        every = cfg.print_every or max(1, self.batches_per_epoch // 4)
        show = cfg.progress and self.rank == 0
        bar = _progress_bar(self.batches_per_epoch, f"epoch {epoch}/{cfg.epochs}", show)
        start = time.perf_counter()
        eps = 0.0
        for b in range(self.batches_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if len(idx) < self.world_size:
                continue
            eps = self.eps_at(epoch, b + 1)
            kappa, beta = self.mixing(eps)
            noise = None
            if cfg.method == "pgd":
                noise = torch.rand(len(idx), *self.x_all.shape[1:], generator=self._generator(epoch, b), device="cpu")
                noise = noise.to(self.device) * 2 - 1
            part = slice(*_part_bounds(len(idx), self.world_size, self.rank))
            local = idx[part]
            scale = self.world_size / len(idx)
            x, y = self.x_all[local], self.y_all[local]
            loss, nat, robust, correct = self.step_module(x, y, eps, kappa, beta,
                                                         None if noise is None else noise[part], scale)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            batch_sums = self._batch_sums(loss.detach() / scale, nat, robust, correct)
            sums = batch_sums if sums is None else sums + batch_sums
            # reading the sums waits for the device: on an accelerator only every `every` batches
            due = (b + 1) % every == 0 or b + 1 == self.batches_per_epoch
            if show and (due or (bar is not None and may_read(sums))):
                postfix = _postfix(_totals(sums), eps)
                if bar is not None:
                    bar.set_postfix_str(postfix)
                else:
                    self.log(f"  epoch {epoch}/{cfg.epochs} [{b + 1}/{self.batches_per_epoch}] {postfix}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        totals = _totals(sums)
        count = max(totals["n"], 1)
        return {"epoch": epoch, "eps": eps, "lr": self.optimizer.param_groups[0]["lr"],
                "loss": totals["loss"] / count, "nat_ce": totals["nat_ce"] / count,
                "robust_ce": totals["robust_ce"] / totals["n_robust"] if totals["n_robust"] else None,
                "train_err": 1.0 - totals["correct"] / count, "time_s": time.perf_counter() - start}

    def _batch_sums(self, loss_sum_local, nat, robust, correct) -> torch.Tensor:
        """Sums over this batch (all processes), float64 on the device: loss (per-sample sum), natural
        CE, robust CE, correct, samples, samples with a robust CE (see :func:`_totals`)."""
        has_rob = ~torch.isnan(robust)
        vec = torch.stack([loss_sum_local.reshape(()).float(), nat.sum(), torch.where(has_rob, robust, 0.0).sum(),
                           correct.sum(), nat.new_tensor(float(len(nat))), has_rob.sum().float()]).double()
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(vec)
        return vec

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, eps: float | None = None, limit: int | None = None) -> dict[str, float]:
        cfg = self.config
        if self.test_data is None:
            return {}
        eps = cfg.target_eval_eps if eps is None else eps
        graph = self.eval_graph
        if graph is None and cfg.eval_methods:
            from .. import capture

            graph = self.eval_graph = capture(self.model, self.x_all[:2])
        return evaluate(self.model, self.test_data, eps, cfg.eval_methods, graph=graph,
                        pgd_steps=cfg.eval_pgd_steps, batch_size=cfg.eval_batch_size,
                        limit=cfg.eval_limit if limit is None else limit, norm=cfg.norm, clip_min=cfg.clip_min,
                        clip_max=cfg.clip_max, seed=cfg.seed, num_classes=self.num_classes)

    # -- the whole run -------------------------------------------------------------------------
    def fit(self, resume: bool | str | Path = False) -> TrainResult:
        """Train for ``config.epochs`` epochs (continuing a checkpoint when ``resume``: True for
        ``out_dir/checkpoint.pt``, or a path)."""
        cfg = self.config
        if resume:
            path = Path(resume) if not isinstance(resume, bool) else self._checkpoint_path()
            if path is None:
                raise ValueError("resume=True needs config.out_dir")
            if path.exists():
                self.load_checkpoint(path)
                if self.rank == 0 and cfg.progress:
                    self.log(f"resumed from {path} after epoch {self.epoch}")
            elif self.rank == 0 and cfg.progress:
                self.log(f"no checkpoint at {path}: starting afresh")
        if self.rank == 0 and cfg.progress and self.epoch == 0:
            mode = "loss fusion" if self.fusion else ("margin specification" if cfg.method in ROBUST_METHODS else "")
            self.log(f"training {cfg.method} {mode}: eps {cfg.eps} ({self.eps_scheduler!r}), {cfg.epochs} epochs x "
                     f"{self.batches_per_epoch} batches of {cfg.batch_size}, {self.world_size} process(es)")
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            stats = self.train_epoch(epoch)
            self.lr_scheduler.step()
            if self.rank == 0 and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                start = time.perf_counter()
                stats.update(self.evaluate())
                stats["eval_time_s"] = time.perf_counter() - start
            self.epoch = epoch
            self.history.append(stats)
            if self.rank == 0:
                if cfg.progress:
                    self.log(_epoch_line(stats, cfg.epochs))
                if self.out_dir is not None:
                    self.save_checkpoint(self._checkpoint_path())
            if self.world_size > 1:
                import torch.distributed as dist

                dist.barrier()
        result = TrainResult(self.history, dict(self.history[-1]) if self.history else {},
                             str(self.out_dir) if self.out_dir else None)
        if self.rank == 0:
            self.write_outputs()
        return result

    # -- files ---------------------------------------------------------------------------------
    def _checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "eps_scheduler": self.eps_scheduler.state_dict(),
                "epoch": self.epoch, "history": self.history, "config": self.config.to_dict(),
                "num_classes": self.num_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.eps_scheduler.load_state_dict(state["eps_scheduler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])

    def save_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def write_outputs(self) -> None:
        """``metrics.json``, ``model.pt`` and ``training.png`` in ``out_dir``; the final table on the log."""
        from .report import format_table, plot_history

        if self.config.progress and self.history:
            self.log(format_table(self.history, self.config.eval_methods))
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"config": self.config.to_dict(), "num_classes": self.num_classes, "loss_fusion": self.fusion,
                   "world_size": self.world_size, "history": self.history,
                   "final": self.history[-1] if self.history else {}}
        (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
        # CPU copies: the file loads on a machine without the training device
        torch.save({k: v.cpu() for k, v in self.model.state_dict().items()}, self.out_dir / "model.pt")
        plot_history(self.history, self.out_dir / "training.png", title=f"{self.config.method}, eps {self.config.eps}")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if torch.is_tensor(value):
        return value.tolist()
    return str(value)


def _part_bounds(n: int, parts: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of ``torch.tensor_split``'s part ``rank`` of ``n`` items into ``parts``."""
    base, extra = divmod(n, parts)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) == 2:
        return tensors[0], tensors[1].long()
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.stack([torch.as_tensor(v, device="cpu") for v in ys]).long()


def _totals(sums: torch.Tensor | None) -> dict[str, Any]:
    """:meth:`Trainer._batch_sums`'s vector (None: no batch) as named numbers (one host read)."""
    loss, nat_s, rob_s, cor, n, n_rob = [0.0] * 6 if sums is None else sums.tolist()
    return {"loss": loss, "nat_ce": nat_s, "robust_ce": rob_s, "correct": cor, "n": int(n), "n_robust": int(n_rob)}


def _postfix(totals: dict[str, Any], eps: float) -> str:
    n = max(totals["n"], 1)
    text = f"eps {eps:.4f} loss {totals['loss'] / n:.4f} acc {totals['correct'] / n:.3f}"
    if totals["n_robust"]:
        text += f" robust-ce {totals['robust_ce'] / totals['n_robust']:.4f}"
    return text


def _epoch_line(stats: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {stats['epoch']}/{epochs}", f"eps {stats['eps']:.4f}", f"loss {stats['loss']:.4f}",
             f"train err {stats['train_err']:.3f}"]
    for key, label in (("clean_err", "clean err"), ("pgd_err", "PGD err")):
        if key in stats:
            parts.append(f"{label} {stats[key]:.3f}")
    for key, value in stats.items():
        if key.startswith("verified_err_"):
            parts.append(f"verified err ({key.removeprefix('verified_err_').upper()}) {value:.3f}")
    parts.append(f"{stats['time_s']:.1f}s")
    return "  ".join(parts)


def train(model: nn.Module, train_data: Dataset, test_data: Dataset | None = None,
          config: TrainConfig | None = None, resume: bool | str | Path = False, **kw: Any) -> TrainResult:
    """Train ``model`` in place (:class:`Trainer` with ``config``); returns the history."""
    return Trainer(model, train_data, test_data, config or TrainConfig(), **kw).fit(resume=resume)


__all__ = ["CHECKPOINT_NAME", "FUSION_MIN_CLASSES", "LossModule", "TrainConfig", "TrainResult", "Trainer", "train"]
