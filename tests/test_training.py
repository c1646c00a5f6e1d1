"""Certified training: eps schedules, training runs, checkpoints, evaluation, the CLI and DDP."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from boundprop.cli.main import main as cli_main
from boundprop.training import (
    FixedScheduler,
    LinearScheduler,
    SmoothedScheduler,
    TrainConfig,
    Trainer,
    evaluate,
    make_scheduler,
    robust_ce,
)
from boundprop.training.data import load_digits_dataset, synthetic_dataset
from boundprop.training.models import DIGIT_MODELS, build_digit_model
from boundprop.training.schedulers import scheduler_from_state

# ---------------------------------------------------------------------------------------------
# eps schedules


def _reference_smoothed(max_eps, start, length, n, mid, beta, epoch, batch):
    """auto_LiRPA's SmoothedScheduler arithmetic, written out independently (1-based epoch, batch)."""
    step = (epoch - 1) * n + batch
    init_step = (start - 1) * n
    final_step = (start + length - 1) * n
    mid_step = int((final_step - init_step) * mid) + init_step
    t = (mid_step - init_step) ** (beta - 1.0)
    alpha = max_eps / ((final_step - mid_step) * beta * t + (mid_step - init_step) * t)
    mid_value = alpha * (mid_step - init_step) ** beta
    if step <= init_step:
        return 0.0
    if step < mid_step:
        return alpha * float(step - init_step) ** beta
    return min(mid_value + (max_eps - mid_value) * (step - mid_step) / (final_step - mid_step), max_eps)


def test_linear_scheduler():
    s = LinearScheduler(0.4, start=3, length=2, epoch_length=10)
    assert s.value(1, 5) == 0.0 and s.value(2, 10) == 0.0  # warm-up epochs
    assert s.is_warmup(2) and not s.is_warmup(3)
    assert s.value(3, 1) == pytest.approx(0.4 / 20)
    assert s.value(3, 10) == pytest.approx(0.2)
    assert s.value(4, 10) == pytest.approx(0.4)
    assert s.value(9, 3) == pytest.approx(0.4)
    values = [s.value(e, b) for e in range(1, 6) for b in range(1, 11)]
    assert values == sorted(values)


def test_smoothed_scheduler_matches_reference_and_is_smooth():
    max_eps, start, length, n = 0.3, 2, 5, 7
    s = SmoothedScheduler(max_eps, start=start, length=length, mid=0.25, beta=4.0, epoch_length=n)
    values = []
    for epoch in range(1, 9):
        for batch in range(1, n + 1):
            v = s.value(epoch, batch)
            assert v == pytest.approx(_reference_smoothed(max_eps, start, length, n, 0.25, 4.0, epoch, batch),
                                      abs=1e-12)
            values.append(v)
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == pytest.approx(max_eps)
    # slow start: the polynomial part stays below the linear ramp
    lin = LinearScheduler(max_eps, start=start, length=length, epoch_length=n)
    assert s.value(start, 3) < lin.value(start, 3)
    # continuity at the switch point: consecutive increments never jump
    diffs = [b - a for a, b in zip(values, values[1:])]
    assert max(diffs) <= max_eps / (length * n) * 1.5
    with pytest.raises(ValueError):
        SmoothedScheduler(0.1, beta=1.0)


def test_fixed_scheduler_and_stateful_interface():
    s = FixedScheduler(0.2, start=2, epoch_length=4)
    assert s.value(1, 4) == 0.0 and s.value(2, 1) == 0.2
    s = make_scheduler("linear", 1.0, start=1, length=1, epoch_length=4)
    s.step_epoch()
    got = []
    for _ in range(4):
        s.step_batch()
        got.append(s.get_eps())
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0])
    s.eval()
    assert s.get_eps() == 1.0 and s.get_max_eps() == 1.0
    t = scheduler_from_state(SmoothedScheduler(0.5, 3, 4, mid=0.4, beta=3.0, epoch_length=9).state_dict())
    assert isinstance(t, SmoothedScheduler) and (t.mid, t.beta, t.start, t.length) == (0.4, 3.0, 3, 4)


# ---------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits_dataset(train_limit=256, test_limit=64)
    return train, test


def _robust_loss(trainer: Trainer, x, y, eps: float, method: str) -> float:
    with torch.no_grad():
        return float(robust_ce(trainer.graphs, x, y, eps, method, 10, beta=1.0, fusion=trainer.fusion).mean())


@pytest.mark.parametrize("method,fusion", [("ibp", False), ("crown-ibp", True)])
def test_short_training_reduces_robust_loss(digits, method, fusion):
    train, test = digits
    model = build_digit_model("digits_mlp", seed=0)
    cfg = TrainConfig(method=method, eps=0.05, epochs=2, batch_size=32, lr=3e-3, schedule="fixed", warmup_epochs=0,
                      kappa_start=0.0, kappa_end=0.0, loss_fusion=fusion, eval_methods=("ibp",), eval_pgd_steps=0,
                      progress=False)
    trainer = Trainer(model, train, test, cfg)
    assert trainer.fusion is fusion
    x, y = train.tensors
    before = _robust_loss(trainer, x, y, 0.05, method)
    before_err = trainer.evaluate()["verified_err_ibp"]
    result = trainer.fit()
    after = _robust_loss(trainer, x, y, 0.05, method)
    assert len(result.history) == 2 and result.history[-1]["robust_ce"] is not None
    assert after < before
    assert result.final["verified_err_ibp"] <= before_err


def test_resume_gives_the_same_state(tmp_path, digits):
    train, _ = digits
    common = dict(method="pgd", eps=0.1, epochs=2, batch_size=64, pgd_steps=2, warmup_epochs=0, ramp_epochs=2,
                  schedule="linear", lr_milestones=(1,), progress=False, eval_methods=())
    straight = build_digit_model("digits_mlp", seed=1)
    Trainer(straight, train, None, TrainConfig(**common)).fit()
    first = build_digit_model("digits_mlp", seed=1)
    Trainer(first, train, None, TrainConfig(**{**common, "epochs": 1}, out_dir=str(tmp_path))).fit()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and "optimizer" in ckpt and "eps_scheduler" in ckpt and "lr_scheduler" in ckpt
    resumed_model = build_digit_model("digits_mlp", seed=1)
    trainer = Trainer(resumed_model, train, None, TrainConfig(**common, out_dir=str(tmp_path)))
    result = trainer.fit(resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert trainer.lr_scheduler.last_epoch == 2 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_evaluate_orders_errors(digits):
    _, test = digits
    model = build_digit_model("digits_mlp", seed=0)
    out = evaluate(model, test, 0.02, methods=("ibp", "crown"), pgd_steps=5)
    assert out["n"] == 64
    assert out["clean_err"] <= out["pgd_err"] <= out["verified_err_crown"] <= out["verified_err_ibp"]


def test_models_build_for_digits():
    x = torch.rand(2, 1, 8, 8)
    for name in DIGIT_MODELS:
        model = build_digit_model(name, num_classes=7)
        assert model(x).shape == (2, 7)


def test_loss_fusion_auto_threshold():
    data = synthetic_dataset(8, 40, shape=(4,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 40))
    assert Trainer(model, data, None, TrainConfig(method="ibp", progress=False), num_classes=40).fusion
    cfg = TrainConfig(method="ibp", loss_fusion=False, progress=False)
    assert not Trainer(model, data, None, cfg, num_classes=40).fusion
    assert not Trainer(model, data, None, TrainConfig(method="natural", progress=False), num_classes=40).fusion
    small = torch.nn.Sequential(torch.nn.Linear(4, 10))
    assert not Trainer(small, data, None, TrainConfig(method="ibp", progress=False), num_classes=10).fusion


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--arch", "digits_mlp", "--method", "ibp", "--eps", "0.05", "--epochs", "2", "--warmup", "1",
            "--train-limit", "96", "--eval-limit", "32", "--eval-methods", "ibp", "--eval-pgd-steps", "2",
            "--batch-size", "32", "--ibp-init", "--out", str(out)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "verified IBP" in text and "epoch 2/2" in text
    for name in ("checkpoint.pt", "model.pt", "metrics.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "verified_err_ibp" in metrics["final"]
    assert (out / "training.png").exists()
    # resume for one more epoch
    assert cli_main([*argv[:argv.index("--epochs")], "--epochs", "3", *argv[argv.index("--epochs") + 2:],
                     "--resume", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]


def test_cli_train_errors(capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(["train", "--resume"])
    assert err.value.code == 2 and "--resume needs --out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# several processes


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    return build_digit_model("digits_mlp", seed=seed)


@pytest.mark.slow
def test_ddp_matches_single_process():
    from boundprop.training.distributed import train_distributed

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (40,), generator=gen)
    data = TensorDataset(x, y)
    cfg = TrainConfig(method="crown-ibp", eps=0.05, epochs=1, batch_size=20, schedule="fixed", warmup_epochs=0,
                      kappa_start=0.5, kappa_end=0.5, beta_start=0.5, beta_end=0.5, progress=False, eval_methods=())
    single = _tiny_model()
    Trainer(single, data, None, cfg).fit()
    state, history = train_distributed(functools.partial(_tiny_model, 0), data, None, cfg, nprocs=2)
    assert len(history) == 1
    for name, value in single.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_transformer_digits_model_trains_with_bounds():
    """The digits Transformer (rows as tokens) captures, and its robust CE bounds the natural CE."""
    from boundprop.training.losses import capture_graphs

    model = build_digit_model("transformer", seed=0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    graphs = capture_graphs(model, x, fusion=True)
    natural = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    for method, fusion in (("ibp", False), ("crown-ibp", False), ("crown-ibp", True)):
        loss = robust_ce(graphs, x, y, 0.01, method, 10, fusion=fusion)
        assert torch.isfinite(loss).all() and (loss >= natural - 1e-4).all(), (method, fusion)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_ibp_init_keeps_initial_bounds_small():
    """IBP initialisation (Shi et al. 2021): the robust loss of a deep model starts near log(K), not in the hundreds."""
    from boundprop.training.losses import capture_graphs
    from boundprop.training.models import ibp_init

    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    default = build_digit_model("cnn7_bn", seed=0)
    init = ibp_init(build_digit_model("cnn7_bn", seed=0), seed=0)
    conv = init[0]
    assert abs(float(conv.weight.std()) - (2 * torch.pi) ** 0.5 / conv.weight[0].numel()) < 0.5 * float(conv.weight.std())
    assert all(float(m.bias.abs().max()) == 0 for m in init.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None)
    losses = {}
    for name, model in (("default", default), ("ibp", init)):
        with torch.no_grad():
            losses[name] = float(robust_ce(capture_graphs(model, x, False), x, y, 0.1, "ibp", 10).mean())
    assert losses["ibp"] < 3.0 < 50.0 < losses["default"], losses


@pytest.mark.parametrize("method,fusion", [("crown-ibp", True), ("pgd", False)])
def test_training_places_every_tensor_it_makes(digits, method, fusion):
    """Training and evaluation make their tensors on the model's device (random draws on the CPU,
    then moved): with ``meta`` as the default device, a tensor made without one would fail here
    instead of on a GPU. The run is the same as without the default device."""
    train, test = digits
    small = TensorDataset(*(t[:64] for t in train.tensors))
    histories = []
    for default in (None, "meta"):
        model = build_digit_model("digits_cnn", seed=0)
        cfg = TrainConfig(method=method, eps=0.05, epochs=1, batch_size=32, schedule="fixed", warmup_epochs=0,
                          loss_fusion=fusion, eval_methods=("ibp", "crown-ibp"), eval_pgd_steps=2, eval_limit=32,
                          pgd_steps=2, progress=False, device="cpu")
        trainer = Trainer(model, small, test, cfg)
        if default is None:
            histories.append(trainer.fit().history)
        else:
            with torch.device(default):
                histories.append(trainer.fit().history)
    for a, b in zip(*histories):
        for key in ("loss", "nat_ce", "robust_ce", "verified_err_ibp", "verified_err_crown-ibp", "pgd_err"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key


def test_cli_train_device_errors(capsys):
    argv = ["train", "--epochs", "1", "--train-limit", "8", "--device"]
    for device, message in (("warp-drive", "--device"), ("cuda", "CUDA is not available")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as err:
            cli_main([*argv, device])
        assert err.value.code == 2 and message in capsys.readouterr().err
