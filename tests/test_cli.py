"""The `boundprop bounds` command: defaults, options, model sources, inputs, plot, errors."""

import re
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from boundprop.cli import bounds as bounds_cmd
from boundprop.cli import loaders
from boundprop.cli.main import main

_GRAPHS: dict = {}


@pytest.fixture(autouse=True)
def reuse_captures(monkeypatch):
    """Capture each (architecture, weights, input shape) once per test session: capture costs seconds.

    Sound to share: a graph reads its parameters live from its module, and equal keys mean equal weights.
    """
    real = bounds_cmd.capture

    def cached(model, x):
        key = (str(model), tuple(x.shape[1:]),
               tuple((k, tuple(v.shape), float(v.double().sum()), float(v.double().square().sum()))
                     for k, v in model.state_dict().items()))
        if key not in _GRAPHS:
            _GRAPHS[key] = real(model, x)
        return _GRAPHS[key]

    monkeypatch.setattr(bounds_cmd, "capture", cached)


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def summary(out: str) -> dict[str, list[str]]:
    """Rows of the summary table, by method name."""
    table = out.split("summary over", 1)[1].splitlines()[2:]
    return {row.split()[0]: row.split()[1:] for row in table if row.strip() and not row.strip().startswith("n/a:")}


def test_defaults_bundled_digits(capsys):
    assert main(["bounds"]) == 0
    out = capsys.readouterr().out
    assert "bundled digits classifier" in out and "5 bundled digits test images" in out
    assert "eps = 0.03, clipped to [0, 1]" in out and "margin" in out
    assert re.search(r"capture: [\d.]+ s", out) and re.search(r"one forward pass: [\d.]+ ms", out)
    assert out.count("\nsample ") == 5
    rows = summary(out)
    assert list(rows) == ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN", "forward"]
    verified = {m: int(r[-1].split("/")[0]) for m, r in rows.items() if r[-1] != "n/a"}
    # the default is chosen to make the comparison interesting: CROWN verifies samples IBP cannot
    assert verified["CROWN"] > verified["IBP"]
    assert verified["CROWN-IBP"] >= verified["IBP"]
    widths = {m: float(r[2]) for m, r in rows.items() if r[2] != "n/a"}
    assert widths["CROWN"] <= widths["IBP"]


def test_options_per_sample_timing_no_spec(capsys):
    argv = ["bounds", "--samples", "3", "--eps", "0.01", "--norm", "2", "--method", "IBP", "--method",
            "crown,backward", "--spec", "none", "--no-clip", "--batch-size", "1", "--threads", "1",
            "--model", "digits"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "L2 ball, eps = 0.01" in out and "clipped" not in out and "verified" not in out
    assert out.count("\nsample ") == 3 and "time (ms)" in out
    assert list(summary(out)) == ["IBP", "CROWN"]  # the alias 'backward' is CROWN: listed once


def test_summary_only_and_all_methods_alias(capsys):
    assert main(["bounds", "--samples", "2", "--method", "ibp,CROWN-IBP", "--summary-only"]) == 0
    out = capsys.readouterr().out
    assert "\nsample " not in out and "summary over 2 samples" in out


def test_module_factory_file_and_module(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def make():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))

        class Holder:
            net = make()
    """))
    assert main(["bounds", "--model", f"{tmp_path / 'my_models.py'}:make", "--method", "IBP,CROWN",
                 "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "my_models.py:make (Sequential, 910 parameters)" in out
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["bounds", "--model", "my_models:Holder.net", "--method", "IBP", "--samples", "1"]) == 0
    assert "summary over 1 sample" in capsys.readouterr().out


def test_saved_pt_models(tmp_path, capsys):
    whole = tmp_path / "whole.pt"
    torch.save(small_mlp(), whole)
    assert main(["bounds", "--model", str(whole), "--method", "CROWN", "--samples", "2"]) == 0
    assert "Sequential, 1,210 parameters" in capsys.readouterr().out

    from boundprop.data.digits import digits_mlp

    state = tmp_path / "state.pt"
    torch.save(digits_mlp().state_dict(), state)
    assert main(["bounds", "--model", str(state), "--arch", "digits_mlp", "--method", "IBP",
                 "--samples", "2"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["bounds", "--model", str(state), "--method", "IBP"])
    assert exc.value.code == 2
    assert "holds a state dict" in capsys.readouterr().err


def test_input_files_with_and_without_labels(tmp_path, capsys):
    from boundprop.data import load_digits_samples

    x, y = load_digits_samples(4)
    np.save(tmp_path / "x.npy", x.numpy())
    assert main(["bounds", "--input", str(tmp_path / "x.npy"), "--method", "IBP,CROWN", "--clip"]) == 0
    out = capsys.readouterr().out
    assert "labels: the model's predictions" in out and "summary over 4 samples" in out
    torch.save({"x": x, "labels": y}, tmp_path / "xy.pt")
    assert main(["bounds", "--input", str(tmp_path / "xy.pt"), "--samples", "3", "--method", "IBP"]) == 0
    out = capsys.readouterr().out
    assert "labels: data" in out and "clipped" not in out and "summary over 3 samples" in out
    np.savez(tmp_path / "xy.npz", images=x.numpy(), targets=y.numpy())
    assert main(["bounds", "--input", str(tmp_path / "xy.npz"), "--method", "IBP", "--spec", "none"]) == 0


def test_plot_png(tmp_path, capsys):
    out_png = tmp_path / "bounds.png"
    assert main(["bounds", "--samples", "2", "--method", "IBP,CROWN", "--plot", str(out_png)]) == 0
    assert out_png.exists() and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot of sample 0 written" in capsys.readouterr().out
    raw_png = tmp_path / "raw.png"
    assert main(["bounds", "--samples", "1", "--method", "IBP", "--spec", "none", "--plot", str(raw_png)]) == 0
    assert raw_png.stat().st_size > 1000


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit) as exc:
        main(["bounds", "--method", "IBP", "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bad_method_exits_with_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bounds", "--method", "IBP,magic"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown bound method 'magic'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_module_xyz:make"], "cannot import module"),
    (["--model", "missing.pt"], "no such file"),
    (["--input", "missing.npy"], "no such input file"),
    (["--samples", "1000"], "asked for 1000 samples"),
    (["--eps", "-1"], "--eps must be >= 0"),
    (["--device", "quantum"], "--device"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]),
])
def test_user_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bounds", "--method", "IBP", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_not_implemented_method_is_na(monkeypatch, capsys):
    real = bounds_cmd.compute_bounds

    def fake(graph, inputs, ptb, method="crown", **kw):
        if method == "forward":
            raise NotImplementedError("forward mode is not implemented yet")
        return real(graph, inputs, ptb, method=method, **kw)

    monkeypatch.setattr(bounds_cmd, "compute_bounds", fake)
    assert main(["bounds", "--samples", "2", "--method", "IBP,forward"]) == 0
    out = capsys.readouterr().out
    assert summary(out)["forward"] == ["n/a"] * 4
    assert "n/a: forward: forward mode is not implemented yet" in out


def test_onnx_model(tmp_path, capsys, monkeypatch):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(16, 64)).astype(np.float32), rng.normal(size=(10, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    monkeypatch.setattr(loaders, "ONNX_IMPORTERS", (("boundprop.no_such_onnx_module", "import_onnx"),))
    with pytest.raises(SystemExit) as exc:
        main(["bounds", "--model", str(path), "--method", "IBP"])
    assert "ONNX import not available yet" in capsys.readouterr().err and exc.value.code == 2
    monkeypatch.undo()

    if not any(loaders._find_module(name) for name, _ in loaders.ONNX_IMPORTERS):
        pytest.skip("no ONNX importer in this tree yet")
    runs = []
    for device in ("cpu", "auto"):  # auto: CUDA when available (the graph's constants move there)
        assert main(["bounds", "--model", str(path), "--method", "IBP,CROWN", "--samples", "2",
                     "--device", device]) == 0
        out = capsys.readouterr().out
        assert "ONNX model" in out and "summary over 2 samples" in out
        runs.append({m: row[2:] for m, row in summary(out).items()})  # widths and verified counts
    assert runs[0] == runs[1]
