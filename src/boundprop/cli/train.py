"""``boundprop train``: certified (or natural / adversarial) training of a small classifier.

Data: ``digits`` (the whole bundled 8x8 digits set, 1347 training and 450 test images, inputs in
``[0, 1]``) or ``synthetic`` (random images with ``--classes`` labels from a random linear
teacher, for scaling checks). Architectures: :data:`boundprop.training.models.DIGIT_MODELS`.
Writes to ``--out``: ``checkpoint.pt`` (every epoch; ``--resume`` continues it), ``model.pt``,
``metrics.json`` and ``training.png``; prints progress and a final table.

Several processes: ``--ddp N`` spawns N workers (DistributedDataParallel, gloo, CPU), or run
under ``torchrun --nproc_per_node N -m boundprop.cli.main train ...``. ``--batch-size`` is the
global batch either way.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .loaders import CliError, add_device_argument, device_from_args

NORMS = {"inf": math.inf, "2": 2.0, "1": 1.0}
FUSION = {"auto": "auto", "on": True, "off": False}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..training.losses import METHODS
    from ..training.models import DIGIT_MODELS
    from ..training.schedulers import SCHEDULES

    p = subparsers.add_parser(
        "train", help="certified training (IBP, CROWN-IBP, CROWN), PGD or natural training on the digits",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits", help="data set (default: digits)")
    p.add_argument("--classes", type=int, default=10, help="classes of --data synthetic (default: 10)")
    p.add_argument("--train-limit", type=int, default=None, metavar="N", help="use the first N training samples")
    p.add_argument("--arch", choices=sorted(DIGIT_MODELS), default="digits_cnn",
                   help="architecture (default: digits_cnn)")
    p.add_argument("--method", choices=METHODS, default="crown-ibp", help="training method (default: crown-ibp)")
    p.add_argument("--ibp-init", action="store_true",
                   help="IBP initialisation of the weights (Shi et al. 2021), for deep models under certified training")
    p.add_argument("--eps", type=float, default=0.1, help="final training eps, inputs in [0, 1] (default: 0.1)")
    p.add_argument("--eval-eps", type=float, default=None, help="evaluation eps (default: --eps)")
    p.add_argument("--norm", choices=sorted(NORMS), default="inf", help="Lp norm (default: inf)")
    p.add_argument("--epochs", type=int, default=20, help="epochs (default: 20)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr-milestones", default="", metavar="E1,E2", help="epochs after which lr *= --lr-gamma")
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="smoothed", help="eps schedule (default: smoothed)")
    p.add_argument("--warmup", type=int, default=1, metavar="E", help="natural epochs before the ramp (default: 1)")
    p.add_argument("--ramp", type=int, default=None, metavar="E",
                   help="epochs of the eps ramp (default: half of the epochs after warm-up)")
    p.add_argument("--kappa", type=float, nargs=2, default=(1.0, 0.0), metavar=("START", "END"),
                   help="weight of the natural loss at eps 0 and at the final eps (default: 1 0)")
    p.add_argument("--beta", type=float, nargs=2, default=(1.0, 0.0), metavar=("START", "END"),
                   help="CROWN-IBP weight in the CROWN-IBP/IBP bound mixture (default: 1 0)")
    p.add_argument("--loss-fusion", choices=sorted(FUSION), default="auto",
                   help="fuse the loss into the bound (default: auto, on from 32 classes)")
    p.add_argument("--grad-clip", type=float, default=10.0, help="max gradient norm, 0 for none (default: 10)")
    p.add_argument("--pgd-steps", type=int, default=7, help="PGD steps of --method pgd (default: 7)")
    p.add_argument("--eval-methods", default="ibp,crown",
                   help="verified-error methods (default: ibp,crown; '' for none)")
    p.add_argument("--eval-pgd-steps", type=int, default=10, help="PGD steps of the evaluation, 0 for none")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N test samples")
    p.add_argument("--eval-every", type=int, default=1, metavar="E", help="evaluate every E epochs (and at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder: checkpoint, metrics, plot, model")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--ddp", type=int, default=1, metavar="N", help="train on N processes (DDP, gloo; default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    add_device_argument(p, "training and evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress lines (the final table is still printed)")
    p.set_defaults(run=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from ..training import TrainConfig

    try:
        milestones = tuple(int(m) for m in args.lr_milestones.split(",") if m.strip())
    except ValueError as err:
        raise CliError(f"--lr-milestones: {err}") from None
    if args.resume and not args.out:
        raise CliError("--resume needs --out DIR")
    if args.ddp < 1 or args.batch_size < args.ddp:
        raise CliError("--ddp must be >= 1 and at most --batch-size")
    try:
        return TrainConfig(
            method=args.method, eps=args.eps, eval_eps=args.eval_eps, norm=NORMS[args.norm], epochs=args.epochs,
            batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, lr_milestones=milestones,
            lr_gamma=args.lr_gamma, schedule=args.schedule, warmup_epochs=args.warmup, ramp_epochs=args.ramp,
            kappa_start=args.kappa[0], kappa_end=args.kappa[1], beta_start=args.beta[0], beta_end=args.beta[1],
            loss_fusion=FUSION[args.loss_fusion], grad_clip=args.grad_clip or None, pgd_steps=args.pgd_steps,
            eval_methods=tuple(m.strip() for m in args.eval_methods.split(",") if m.strip()),
            eval_pgd_steps=args.eval_pgd_steps, eval_limit=args.eval_limit, eval_every=args.eval_every,
            seed=args.seed, out_dir=args.out, progress=not args.quiet, threads=args.threads,
            device=str(device_from_args(args.device)))
    except ValueError as err:
        raise CliError(str(err)) from None


def load_data(args: argparse.Namespace):
    from ..training.data import load_digits_dataset, synthetic_dataset

    if args.data == "digits":
        if args.classes != 10:
            raise CliError("--classes applies to --data synthetic only (the digits have 10)")
        return (*load_digits_dataset(train_limit=args.train_limit), 10)
    if args.classes < 2:
        raise CliError("--classes must be >= 2")
    n = args.train_limit or 1024
    return (synthetic_dataset(n, args.classes, seed=args.seed),
            synthetic_dataset(max(64, n // 4), args.classes, seed=args.seed + 1), args.classes)


def _model_fn(arch: str, classes: int, seed: int, init: bool = False):
    from ..training.models import build_digit_model, ibp_init

    model = build_digit_model(arch, num_classes=classes, seed=seed)
    return ibp_init(model, seed=seed) if init else model


def _worker(rank: int, world: int, args: argparse.Namespace) -> None:
    from ..training import Trainer

    train_data, test_data, classes = load_data(args)
    model = _model_fn(args.arch, classes, args.seed, args.ibp_init)
    trainer = Trainer(model, train_data, test_data, config_from_args(args), num_classes=classes, rank=rank,
                      world_size=world)
    result = trainer.fit(resume=args.resume)
    if rank == 0 and args.quiet and result.history:  # with progress on, the trainer printed it already
        from ..training.report import format_table

        print(format_table(result.history, trainer.config.eval_methods), flush=True)


def run(args: argparse.Namespace) -> int:
    from ..training.distributed import env_world, init_from_env, spawn

    config = config_from_args(args)  # validate before starting anything
    load_data(args)
    if config.device != "cpu" and (args.ddp > 1 or env_world()[1] > 1):
        raise CliError("--device with several processes: multi-process training runs on the CPU (gloo)")
    if args.ddp > 1:
        if env_world()[1] > 1:
            raise CliError("--ddp inside torchrun: use one or the other")
        spawn(_worker, args.ddp, args)
        return 0
    rank, world = init_from_env()
    try:
        _worker(rank, world, args)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


__all__ = ["add_parser", "run"]
