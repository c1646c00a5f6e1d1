"""The complete verifier: verdicts on hand-made and ACAS Xu instances, counterexamples checked with
onnxruntime, the VNN-COMP result file, the `verify` and `bench` commands (resume), the Python API."""

import csv
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import boundprop
from boundprop.bab import VerifierOptions, verify
from boundprop.bab.attack import pgd_attack
from boundprop.bab.verifier import Network, VerificationResult
from boundprop.cli.main import main
from boundprop.spec.vnnlib import parse_vnnlib, read_vnnlib
from boundprop.syncs import count_syncs, device_paths

# real VNN-COMP networks and properties shipped with the tests (see the README there)
SAMPLE = Path(__file__).resolve().parent / "data" / "vnncomp_sample"
ACAS = SAMPLE / "acasxu"

# quick ACAS Xu instances (onnx, vnnlib, expected): attack-found sat, and unsat needing few boxes
ACAS_CASES = [
    ("onnx/ACASXU_run2a_2_7_batch_2000.onnx", "vnnlib/prop_2.vnnlib", "sat"),
    ("onnx/ACASXU_run2a_4_1_batch_2000.onnx", "vnnlib/prop_2.vnnlib", "sat"),
    ("onnx/ACASXU_run2a_2_7_batch_2000.onnx", "vnnlib/prop_4.vnnlib", "unsat"),
    ("onnx/ACASXU_run2a_1_1_batch_2000.onnx", "vnnlib/prop_1.vnnlib", "unsat"),
    ("onnx/ACASXU_run2a_2_2_batch_2000.onnx", "vnnlib/prop_3.vnnlib", "unsat"),
]


# ---------------------------------------------------------------- hand-made models and properties

def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def identity_model(path: Path) -> Path:
    """``y = 1 * x + 0`` with one input and one output (a Gemm)."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor("W", TensorProto.FLOAT, [1, 1], [1.0]), helper.make_tensor("B", TensorProto.FLOAT, [1], [0.0])])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def relu_model(path: Path) -> Path:
    """``y = (relu(x0 - x1), relu(x1 - x0))``: a 2-2-2 ReLU network whose outputs are exactly known."""
    w1 = [1.0, -1.0, -1.0, 1.0]
    w2 = [1.0, 0.0, 0.0, 1.0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "relu2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor("W1", TensorProto.FLOAT, [2, 2], w1), helper.make_tensor("W2", TensorProto.FLOAT, [2, 2], w2)])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def sigmoid_model(path: Path) -> Path:
    """``y = sigmoid(x)``: not a ReLU chain (bounded by the generic engine)."""
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])], "sigmoid",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def one_input_property(condition: str, lo: float = 0.0, hi: float = 1.0) -> str:
    return ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
            f"(assert (>= X_0 {lo}))\n(assert (<= X_0 {hi}))\n(assert {condition})\n")


@pytest.mark.parametrize("condition,expected", [
    ("(>= Y_0 0.5)", "sat"), ("(>= Y_0 2)", "unsat"), ("(<= Y_0 -0.001)", "unsat"), ("(<= Y_0 0)", "sat"),
    ("(or (>= Y_0 3) (<= Y_0 -1))", "unsat"), ("(or (>= Y_0 3) (<= Y_0 0.25))", "sat"),
])
def test_identity_on_unit_interval(tmp_path, condition, expected):
    """y = x on [0, 1]: the answers follow from the property alone."""
    model = identity_model(tmp_path / "id.onnx")
    result = verify(model, parse_vnnlib(one_input_property(condition)), timeout=30)
    assert result.verdict == expected
    if expected == "sat":
        x, y = result.counterexample
        assert 0 <= float(x) <= 1 and float(y) == pytest.approx(float(x))


@pytest.mark.parametrize("condition,expected", [
    ("(and (>= Y_0 0.5) (>= Y_1 0.5))", "unsat"),  # at most one of the two ReLUs is active
    ("(and (>= Y_0 0.9) (<= Y_1 0))", "sat"),  # x0 - x1 = 0.9 is reachable
    ("(>= Y_0 1.0001)", "unsat"),  # y0 <= 1 on the unit box
    ("(or (and (>= Y_0 0.7) (>= Y_1 0.1)) (and (<= Y_0 -0.01)))", "unsat"),
])
def test_relu_network(tmp_path, condition, expected):
    model = relu_model(tmp_path / "relu.onnx")
    net = Network.from_onnx(model)
    assert net.chain is not None  # handled by the ReLU-chain branch and bound
    text = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
            "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
            f"(assert {condition})\n")
    result = verify(net, parse_vnnlib(text), timeout=30)
    assert result.verdict == expected


@pytest.mark.parametrize("condition,expected", [("(>= Y_0 0.74)", "unsat"), ("(<= Y_0 0.6)", "sat")])
def test_generic_graph_search(tmp_path, condition, expected):
    """sigmoid(x) on [0, 1] lies in [0.5, 0.7311]: branch and bound through compute_bounds."""
    net = Network.from_onnx(sigmoid_model(tmp_path / "sig.onnx"))
    assert net.chain is None
    assert verify(net, parse_vnnlib(one_input_property(condition)), timeout=30).verdict == expected


def test_module_with_input_split():
    """An nn.Module (bounded through float64 copies of its parameters), answers from a dense grid."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    g = torch.linspace(-1, 1, 201)
    grid = torch.cartesian_prod(g, g)
    with torch.no_grad():
        values = model(grid).reshape(-1)
        lipschitz = float(torch.stack([m.weight.abs().sum(1).max() for m in model if isinstance(m, torch.nn.Linear)]
                                      ).prod())
    top = float(values.max())
    box = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
    box += "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 1))\n"
    above = top + lipschitz * 0.01 + 0.05  # no input reaches it: the grid is 0.01 fine
    assert verify(model, parse_vnnlib(box + f"(assert (>= Y_0 {above}))"), timeout=30, input_shape=(1, 2)
                  ).verdict == "unsat"
    result = verify(model, parse_vnnlib(box + f"(assert (>= Y_0 {top - 1e-3}))"), timeout=30, input_shape=(1, 2))
    assert result.verdict == "sat"
    x, y = result.counterexample
    with torch.no_grad():
        assert float(model(x.float().reshape(1, 2))) >= top - 1e-3


def test_high_dimensional_input_without_split():
    """Inputs wider than max_input_split_dims: one bound of the region, unsat or unknown."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    box = "".join(f"(declare-const X_{i} Real)\n" for i in range(4)) + "(declare-const Y_0 Real)\n"
    box += "".join(f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 0.01))\n" for i in range(4))
    with torch.no_grad():
        y0 = float(model(torch.zeros(1, 4)))
    opts = VerifierOptions(max_input_split_dims=2, attack_restarts=2)
    far = parse_vnnlib(box + f"(assert (>= Y_0 {y0 + 100}))\n")
    assert verify(model, far, timeout=30, input_shape=(1, 4), options=opts).verdict == "unsat"
    near = parse_vnnlib(box + f"(assert (>= Y_0 {y0 + 1e-3}))\n")
    assert verify(model, near, timeout=30, input_shape=(1, 4), options=opts).verdict in ("unknown", "unsat", "sat")


def test_timeout_verdict(tmp_path):
    model = relu_model(tmp_path / "relu.onnx")
    text = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
            "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
            "(assert (and (>= Y_0 0.5) (>= Y_1 0.5)))\n")
    assert verify(model, parse_vnnlib(text), timeout=0.0).verdict == "timeout"


def test_wrong_input_count(tmp_path):
    model = relu_model(tmp_path / "relu.onnx")
    with pytest.raises(ValueError, match="inputs"):
        verify(model, parse_vnnlib(one_input_property("(>= Y_0 0)")), timeout=5)


# ---------------------------------------------------------------- result file

def parse_result_file(text: str) -> tuple[str, dict[str, float]]:
    """The VNN-COMP reading of a result file: first word, then ``(name value)`` pairs."""
    word, _, rest = text.strip().partition("\n")
    pairs = {name: float(value) for name, value in re.findall(r"\(\s*([XY]_\d+)\s+([^\s()]+)\s*\)", rest)}
    return word.strip(), pairs


def test_vnncomp_text():
    assert VerificationResult("unsat").vnncomp_text() == "unsat\n"
    assert VerificationResult("timeout").vnncomp_text() == "timeout\n"
    x, y = torch.tensor([0.5, -1e-8], dtype=torch.float32), torch.tensor([3.25], dtype=torch.float32)
    text = VerificationResult("sat", (x, y)).vnncomp_text()
    word, pairs = parse_result_file(text)
    assert word == "sat" and text.startswith("sat\n((X_0 ") and text.rstrip().endswith("))")
    assert list(pairs) == ["X_0", "X_1", "Y_0"]
    assert pairs["X_1"] == float(x[1]) and pairs["Y_0"] == 3.25  # float32 values written exactly


# ---------------------------------------------------------------- ACAS Xu with known answers

def check_counterexample(onnx_path: Path, vnnlib_path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """The VNN-COMP check: x in an input box, onnxruntime(x) == y, and the output condition holds."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    out = session.run(None, {inp.name: x.astype(np.float32).reshape(shape)})[0].reshape(-1)
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)
    prop = read_vnnlib(vnnlib_path)
    ok = False
    for region in prop.regions:
        inside = bool((x >= region.lower.numpy()).all() and (x <= region.upper.numpy()).all())
        for d in region.disjuncts:
            ok |= inside and bool((d.A.numpy() @ out.astype(np.float64) <= d.b.numpy()).all())
    assert ok, "the counterexample does not violate the property"


@pytest.mark.parametrize("onnx_rel,vnnlib_rel,expected", ACAS_CASES)
def test_acasxu_known_answers(onnx_rel, vnnlib_rel, expected):
    result = verify(ACAS / onnx_rel, ACAS / vnnlib_rel, timeout=60)
    assert result.verdict == expected
    if expected == "sat":
        x, y = result.counterexample
        check_counterexample(ACAS / onnx_rel, ACAS / vnnlib_rel, x.numpy(), y.numpy())
        word, pairs = parse_result_file(result.vnncomp_text())
        assert word == "sat" and len(pairs) == 10


# ---------------------------------------------------------------- command line

def test_cli_verify(tmp_path, capsys):
    onnx_rel, vnnlib_rel, _ = ACAS_CASES[0]
    out = tmp_path / "result.txt"
    assert main(["verify", str(ACAS / onnx_rel), str(ACAS / vnnlib_rel), "--timeout", "60",
                 "--result-file", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "result: sat" in printed and "time:" in printed
    word, pairs = parse_result_file(out.read_text())
    assert word == "sat"
    x = np.array([pairs[f"X_{i}"] for i in range(5)])
    y = np.array([pairs[f"Y_{j}"] for j in range(5)])
    check_counterexample(ACAS / onnx_rel, ACAS / vnnlib_rel, x, y)


def test_cli_verify_small_model(tmp_path, capsys):
    model = identity_model(tmp_path / "id.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text(one_input_property("(>= Y_0 2)"))
    out = tmp_path / "r.txt"
    for device in ("cpu", "auto"):  # auto: CUDA when available
        assert main(["verify", str(model), str(prop), "--timeout", "20", "--result-file", str(out),
                     "--device", device]) == 0
        assert out.read_text() == "unsat\n"
        assert "result: unsat" in capsys.readouterr().out


def test_cli_verify_bad_files(tmp_path, capsys):
    model = identity_model(tmp_path / "id.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text(one_input_property("(>= Y_0 2)"))
    cases = [
        ([str(tmp_path / "missing.onnx"), str(prop)], "model file not found"),
        ([str(model), str(tmp_path / "missing.vnnlib")], "property file not found"),
    ]
    bad_prop = tmp_path / "bad.vnnlib"
    bad_prop.write_text("(declare-const X_0 Real)\n(assert (<= X_0 1)\n")
    cases.append(([str(model), str(bad_prop)], "bad property file"))
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_bytes(b"not an onnx file")
    cases.append(([str(bad_model), str(prop)], "cannot load model"))
    two = tmp_path / "two.vnnlib"
    two.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                   "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
                   "(assert (>= Y_0 0))\n")
    cases.append(([str(model), str(two)], "declares 2 inputs"))
    cases.append(([str(model), str(prop), "--device", "tpu-of-dreams"], "--device"))
    if not torch.cuda.is_available():
        cases.append(([str(model), str(prop), "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["verify", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def _instances_csv(folder: Path, rows) -> Path:
    path = folder / "instances.csv"
    lines = [f"{os.path.relpath(ACAS / o, folder)},{os.path.relpath(ACAS / v, folder)},60" for o, v, _ in rows]
    path.write_text("\n".join(lines) + "\n")
    with (folder / "groundtruth.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["onnx", "vnnlib", "timeout_s", "expected", "basis"])
        for (o, v, _), line in zip(rows, lines):
            a, b, _ = line.split(",")
            writer.writerow([a, b, "60", "unsat" if "prop_2" in v else "sat", "test"])  # sat/unsat swapped on purpose
    return path


def test_cli_bench_and_resume(tmp_path, capsys):
    rows = [ACAS_CASES[0], ACAS_CASES[2], ACAS_CASES[1]]  # sat, unsat, sat
    instances = _instances_csv(tmp_path, rows)
    out = tmp_path / "results.csv"
    assert main(["bench", str(instances), "--output", str(out), "--limit", "2", "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "verified (unsat)" in first and "falsified (sat)" in first
    with out.open() as fh:
        done = list(csv.reader(fh))
    assert done[0] == ["onnx", "vnnlib", "result", "time_s"] and len(done) == 3
    assert [r[2] for r in done[1:]] == ["sat", "unsat"]
    assert done[1][0] == instances.read_text().splitlines()[0].split(",")[0]  # paths as in the instances file
    # resume: the two finished instances are not run again, the third one is added
    assert main(["bench", str(instances), "--output", str(out), "--quiet"]) == 0
    second = capsys.readouterr().out
    assert "resuming" in second and "2 of 3" in second
    with out.open() as fh:
        done = list(csv.reader(fh))
    assert len(done) == 4 and done[3][2] == "sat"
    summary = dict(re.findall(r"^\s+(\S.*?)\s{2,}(\S.*)$", second, re.M))
    assert summary["instances"] == "3" and summary["falsified (sat)"] == "2" and summary["verified (unsat)"] == "1"
    assert summary["wrong (vs groundtruth)"].startswith("3 of 3")  # the ground truth written above is inverted


def test_cli_bench_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(tmp_path / "none.csv")])
    assert exc.value.code == 2 and "not found" in capsys.readouterr().err
    bad = tmp_path / "instances.csv"
    bad.write_text("a.onnx,b.vnnlib\n")
    with pytest.raises(SystemExit):
        main(["bench", str(bad)])
    assert "expected onnx,vnnlib,timeout" in capsys.readouterr().err


def test_cli_bench_small_models(tmp_path, capsys):
    """Errors in one instance are reported as `error` and the run goes on."""
    identity_model(tmp_path / "id.onnx")
    (tmp_path / "hi.vnnlib").write_text(one_input_property("(>= Y_0 2)"))
    (tmp_path / "lo.vnnlib").write_text(one_input_property("(>= Y_0 0.5)"))
    (tmp_path / "instances.csv").write_text("id.onnx,hi.vnnlib,10\nid.onnx,lo.vnnlib,10\nmissing.onnx,lo.vnnlib,10\n")
    out = tmp_path / "res.csv"
    assert main(["bench", str(tmp_path / "instances.csv"), "--output", str(out), "--quiet"]) == 0
    with out.open() as fh:
        assert [r[2] for r in list(csv.reader(fh))[1:]] == ["unsat", "sat", "error"]
    assert "unknown/error" in capsys.readouterr().out


def test_python_api():
    assert boundprop.verify is verify and "verify" in boundprop.__all__


@pytest.mark.parametrize("benchmark", ["acasxu", "rl_benchmarks", "collins_rul_cnn_2022"])
def test_shipped_benchmark_sample_has_no_wrong_verdict(benchmark, tmp_path, capsys):
    """Every shipped instance is decided, as its ground truth says, within its VNN-COMP timeout.
    (collins if_then_9levels is sat with a counterexample that only a search finds: a development
    version of the ReLU-split search once called it unsat.)"""
    out = tmp_path / "results.csv"
    assert main(["bench", str(SAMPLE / benchmark / "instances.csv"), "--output", str(out), "--quiet"]) == 0
    summary = dict(re.findall(r"^\s+(\S.*?)\s{2,}(\S.*)$", capsys.readouterr().out, re.M))
    n = len((SAMPLE / benchmark / "instances.csv").read_text().split())
    assert summary["wrong (vs groundtruth)"] == f"0 of {n} scored"
    assert summary["timeout"] == "0" and summary["unknown/error"] == "0"


def test_attack_finds_the_minimum_without_host_reads_per_step():
    """PGD on a 1-D quadratic over boxes finds each box's minimiser, and on the GPU's branches its
    steps read nothing on the host (the best points are kept with ``where``, not bool masks)."""
    lower, upper = torch.tensor([[-1.0], [0.5]]), torch.tensor([[1.0], [2.0]])

    def objective(y):
        return ((y - 0.25) ** 2).reshape(-1)

    with device_paths(), count_syncs() as c:
        x, v = pgd_attack(lambda t: t, lower, upper, objective, restarts=3, steps=40,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, torch.tensor([[0.25], [0.5]]), atol=1e-2, rtol=0)
    assert bool((v >= 0).all())
    assert c.total == 0, c.reads


_TWO_INPUTS = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"


@pytest.mark.parametrize("case,model,condition,box,options,expected", [
    ("chain search", "relu", "(or (and (>= Y_0 0.7) (>= Y_1 0.1)) (and (<= Y_0 -0.01)))", None, {}, "unsat"),
    ("pinned input", "relu", "(>= Y_0 0.6)", ((0, 1), (0.5, 0.5)), {}, "unsat"),
    ("counterexample", "relu", "(and (>= Y_0 0.9) (<= Y_1 0))", None, {}, "sat"),
    ("graph search", "sigmoid", "(>= Y_0 0.74)", None, {}, "unsat"),
    ("ReLU splits", "relu", "(and (>= Y_0 0.5) (>= Y_1 0.5))", None, {"max_input_split_dims": 0}, "unsat"),
    ("root bound", "sigmoid", "(>= Y_0 0.74)", None, {"max_input_split_dims": 0}, "unsat"),
    ("ACAS Xu", "acas", None, None, {}, "unsat"),
])
def test_verifier_places_every_tensor_it_makes(tmp_path, case, model, condition, box, options, expected):
    """Every path of the verifier makes its tensors on the network's device (or, for the LPs and the
    counterexample check, explicitly on the CPU): run with the default device set to ``meta``, a
    tensor made without a device would be a meta tensor and fail the first time it meets a real one.
    This is how the CUDA paths are checked on a machine without a GPU."""
    if model == "acas":
        net, prop = Network.from_onnx(ACAS / ACAS_CASES[2][0]), read_vnnlib(ACAS / ACAS_CASES[2][1])
    else:
        if model == "relu":
            net = Network.from_onnx(relu_model(tmp_path / "relu.onnx"))
            (a0, a1), (b0, b1) = box or ((0, 1), (0, 1))
            text = _TWO_INPUTS + (f"(assert (>= X_0 {a0}))\n(assert (<= X_0 {a1}))\n"
                                  f"(assert (>= X_1 {b0}))\n(assert (<= X_1 {b1}))\n")
        else:
            net = Network.from_onnx(sigmoid_model(tmp_path / "sig.onnx"))
            text = one_input_property("true").replace("(assert true)\n", "")
        prop = parse_vnnlib(text + f"(assert {condition})\n")
    assert net.device == torch.device("cpu")
    with torch.device("meta"):
        result = verify(net, prop, timeout=60, options=VerifierOptions(**options))
    assert result.verdict == expected, case
    if expected == "sat":
        x, y = result.counterexample
        assert x.device.type == "cpu" and y.device.type == "cpu"


def test_network_device_follows_the_module_or_the_option():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    net = boundprop.bab.verifier.load_network(model, (1, 2))
    assert net.device == torch.device("cpu") and net.chain.weights[0].device == net.device
    assert boundprop.bab.verifier.load_network(net, device="cpu") is net
    with pytest.raises(ValueError, match="built for cpu"):
        boundprop.bab.verifier.load_network(net, device="meta")
