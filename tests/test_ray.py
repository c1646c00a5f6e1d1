"""The optional Ray back end: `bench --ray` (same verdicts as the local run, resume, a worker that dies
retried once then `error`), `certify` (same numbers with and without Ray), distributed branch and
bound (same verdicts as `verify`), and the message when Ray is not installed.

One local Ray session (2 CPUs, small object store) serves the whole module: starting Ray costs seconds.
"""

import csv
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from boundprop.cli.main import main

try:
    import ray
except ImportError:  # the tests of the error message still run
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'boundprop[ray]')")
ACAS = Path(__file__).resolve().parent / "data" / "vnncomp_sample" / "acasxu"  # shipped with the tests


@pytest.fixture(scope="module")
def ray_session():
    if ray is None:
        pytest.skip("ray is not installed")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
                 logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


# ---------------------------------------------------------------- small models and properties

def relu_net(path: Path, n_in: int = 4, hidden: int = 8, n_out: int = 3, seed: int = 0) -> Path:
    """``y = W2 relu(W1 x + b1) + b2`` with fixed random weights (Gemm, Relu, Gemm)."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(hidden, n_in)), rng.normal(size=hidden)
    w2, b2 = rng.normal(size=(n_out, hidden)), rng.normal(size=n_out)
    t = lambda name, a: helper.make_tensor(name, TensorProto.FLOAT, a.shape, a.astype(np.float32).ravel())  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], transB=1)], "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])],
        [t("W1", w1), t("B1", b1), t("W2", w2), t("B2", b2)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def box_property(path: Path, lo: list, hi: list, condition: str, n_out: int = 3) -> Path:
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lo))] + [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, (a, b) in enumerate(zip(lo, hi)):
        lines += [f"(assert (>= X_{i} {a}))", f"(assert (<= X_{i} {b}))"]
    lines.append(f"(assert {condition})")
    path.write_text("\n".join(lines) + "\n")
    return path


def small_benchmark(folder: Path) -> Path:
    """Six instances on two networks: thresholds that give sat, unsat and in between, and a missing file."""
    relu_net(folder / "a.onnx", seed=0)
    relu_net(folder / "b.onnx", seed=1)
    rows = []
    for k, (cond, width) in enumerate([("(>= Y_0 1000)", 1.0), ("(>= Y_0 -1000)", 1.0), ("(<= Y_1 Y_2)", 0.3),
                                       ("(>= Y_2 1.5)", 0.5)]):
        box_property(folder / f"p{k}.vnnlib", [-width] * 4, [width] * 4, cond)
        rows += [f"a.onnx,p{k}.vnnlib,20", f"b.onnx,p{k}.vnnlib,20"]
    rows.append("missing.onnx,p0.vnnlib,20")
    (folder / "instances.csv").write_text("\n".join(rows) + "\n")
    return folder / "instances.csv"


def read_rows(path: Path) -> dict:
    with path.open() as fh:
        return {(r[0], r[1]): r[2] for r in list(csv.reader(fh))[1:]}


# ---------------------------------------------------------------- without Ray installed

@pytest.mark.parametrize("command", [["bench", "{csv}", "--ray"], ["certify", "--ray", "--samples", "2"],
                                     ["verify", "{onnx}", "{prop}", "--ray", "auto"]])
def test_missing_ray_is_one_clear_error(tmp_path, capsys, monkeypatch, command):
    csv_path = small_benchmark(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    argv = [a.format(csv=csv_path, onnx=tmp_path / "a.onnx", prop=tmp_path / "p0.vnnlib") for a in command]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pip install 'boundprop[ray]'" in err and "Traceback" not in err


def test_split_box_covers_the_region():
    from boundprop.distributed.ray_bab import split_box

    lo, hi = torch.tensor([0.0, -1.0, 2.0]), torch.tensor([1.0, 1.0, 2.0])  # the last input is pinned
    boxes = split_box(lo, hi, hi - lo, 5)
    assert len(boxes) == 8
    volume = sum(float(torch.prod((b - a)[:2])) for a, b in boxes)
    assert math.isclose(volume, 2.0)
    assert all(bool((a >= lo).all() and (b <= hi).all() and a[2] == 2.0 == b[2]) for a, b in boxes)
    x = torch.rand(200, 3) * (hi - lo) + lo  # every point of the region lies in some box
    assert all(any(bool(((p >= a) & (p <= b)).all()) for a, b in boxes) for p in x)


# ---------------------------------------------------------------- bench --ray

@needs_ray
def test_bench_ray_same_verdicts_and_resume(tmp_path, capsys, ray_session):
    instances = small_benchmark(tmp_path)
    local, distributed = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert main(["bench", str(instances), "--output", str(local), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["bench", str(instances), "--output", str(distributed), "--quiet", "--ray", "--limit", "5"]) == 0
    assert len(read_rows(distributed)) == 5
    # resume: the 5 finished rows stay, only the other 4 run
    assert main(["bench", str(instances), "--output", str(distributed), "--quiet", "--ray"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "5 of 9" in out
    with distributed.open() as fh:
        assert len(list(csv.reader(fh))) == 1 + 9  # no row written twice
    expected = read_rows(local)
    assert read_rows(distributed) == expected
    assert {"sat", "unsat"} <= set(expected.values()) and expected[("missing.onnx", "p0.vnnlib")] == "error"


@needs_ray
def test_bench_ray_worker_death_retried_once(tmp_path, capsys, ray_session, monkeypatch):
    from boundprop.distributed import ray_bench

    instances = small_benchmark(tmp_path)
    lines = instances.read_text().splitlines()
    (tmp_path / "instances.csv").write_text("\n".join([lines[0], lines[1], lines[2]]) + "\n")  # a p0, b p0, a p1
    # p0 on network a: its worker dies twice -> error; p1 on a: dies once -> retried, answered
    monkeypatch.setattr(ray_bench, "CRASH_FOR_TESTS", {"a.onnx p0": 2, "a.onnx p1": 1})
    out = tmp_path / "ray.csv"
    assert main(["bench", str(instances), "--output", str(out), "--quiet", "--ray"]) == 0
    err = capsys.readouterr().err
    rows = read_rows(out)
    assert rows[("a.onnx", "p0.vnnlib")] == "error"
    assert rows[("a.onnx", "p1.vnnlib")] == "sat" and rows[("b.onnx", "p0.vnnlib")] == "unsat"
    assert err.count("retrying once") == 2 and "WorkerCrashedError" in err


@pytest.mark.slow
@needs_ray
def test_bench_ray_watchdog_cancels_a_hung_task(tmp_path, capsys, ray_session, monkeypatch):
    from boundprop.distributed import ray_bench

    instances = small_benchmark(tmp_path)
    (tmp_path / "instances.csv").write_text("a.onnx,p0.vnnlib,1\nb.onnx,p0.vnnlib,20\n")
    monkeypatch.setattr(ray_bench, "HANG_FOR_TESTS", {"a.onnx p0": 600.0})
    monkeypatch.setattr(ray_bench, "hard_limit", lambda timeout: 3.0 if timeout < 5 else 120.0)
    out = tmp_path / "ray.csv"
    assert main(["bench", str(instances), "--output", str(out), "--quiet", "--ray"]) == 0
    assert read_rows(out) == {("a.onnx", "p0.vnnlib"): "timeout", ("b.onnx", "p0.vnnlib"): "unsat"}
    assert "cancelled" in capsys.readouterr().err


@pytest.mark.slow
@needs_ray
def test_bench_ray_acas_same_as_local(tmp_path, ray_session):
    lines = ["onnx/ACASXU_run2a_1_1_batch_2000.onnx,vnnlib/prop_1.vnnlib,60",
             "onnx/ACASXU_run2a_2_7_batch_2000.onnx,vnnlib/prop_2.vnnlib,60",
             "onnx/ACASXU_run2a_2_7_batch_2000.onnx,vnnlib/prop_4.vnnlib,60"]
    for sub in ("onnx", "vnnlib"):
        (tmp_path / sub).symlink_to(ACAS / sub)
    (tmp_path / "instances.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ray.csv"
    assert main(["bench", str(tmp_path / "instances.csv"), "--output", str(out), "--quiet", "--ray"]) == 0
    assert read_rows(out) == {("onnx/ACASXU_run2a_1_1_batch_2000.onnx", "vnnlib/prop_1.vnnlib"): "unsat",
                              ("onnx/ACASXU_run2a_2_7_batch_2000.onnx", "vnnlib/prop_2.vnnlib"): "sat",
                              ("onnx/ACASXU_run2a_2_7_batch_2000.onnx", "vnnlib/prop_4.vnnlib"): "unsat"}


# ---------------------------------------------------------------- certify

def certify_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A 4-16-3 ReLU classifier and 12 inputs in [0, 1] labelled by it, the first two labels wrong."""
    import onnxruntime as ort

    model = relu_net(tmp_path / "clf.onnx", n_in=4, hidden=16, n_out=3, seed=3)
    x = np.random.default_rng(0).uniform(0, 1, size=(12, 4)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    y = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(12)]).argmax(1)
    y[:2] = (y[:2] + 1) % 3
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return model, tmp_path / "data.npz"


def certify_argv(model, data, out, methods="crown,alpha-crown,complete", *extra):
    return ["certify", "--model", str(model), "--data", str(data), "--clip", "--eps", "0.15,0.3", "--method", methods,
            "--timeout", "5", "--batch-size", "6", "--output", str(out), "--quiet", *extra]


def _table(out: str) -> str:
    return out[out.index("certified accuracy"):out.index("time (s")]


def test_certify_local_and_resume(tmp_path, capsys):
    model, data = certify_inputs(tmp_path)
    out = tmp_path / "local.csv"
    assert main(certify_argv(model, data, out, "crown,complete", "--plot", str(tmp_path / "cert.png"))) == 0
    first = capsys.readouterr().out
    assert (tmp_path / "cert.png").stat().st_size > 0
    assert "clean accuracy 83.3% (10/12)" in first
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 * 2 * 2
    by = {(int(r["index"]), float(r["eps"]), r["method"]): r["result"] for r in rows}
    assert by[(0, 0.15, "crown")] == by[(1, 0.3, "complete")] == "misclassified"
    for (i, e, m), result in by.items():  # complete never certifies less than CROWN; a sat stays sat
        if m == "crown" and result == "certified":
            assert by[(i, e, "complete")] == "certified"
        if m == "complete" and result == "falsified" and e == 0.15:
            assert by[(i, 0.3, "complete")] == "falsified"
    results = set(by.values())
    assert {"certified", "not certified", "falsified", "misclassified"} <= results
    assert sum(r == "certified" for (_, _, m), r in by.items() if m == "complete") > \
        sum(r == "certified" for (_, _, m), r in by.items() if m == "crown")  # complete proves more here
    assert main(certify_argv(model, data, out, "crown,complete")) == 0
    second = capsys.readouterr().out
    assert "2 of 2 batches already done" in second and _table(second) == _table(first)
    out.unlink()  # --device auto: CUDA when available, the same table
    assert main(certify_argv(model, data, out, "crown,complete", "--device", "auto")) == 0
    assert _table(capsys.readouterr().out) == _table(first)


def test_certify_places_every_tensor_it_makes(tmp_path):
    """Every certification method makes its tensors on the network's device (or explicitly on the
    CPU): with ``meta`` as the default device, a tensor made without one would fail. The records are
    those of a run without it."""
    from boundprop.certify import CertifyOptions, ModelSource, certify_batch

    model, data = certify_inputs(tmp_path)
    arrays = np.load(data)
    x, labels = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    source = ModelSource((1, 4), onnx=model.read_bytes(), name=str(model), device="cpu")
    opts = CertifyOptions(eps=(0.15, 0.3), methods=("crown", "alpha-crown", "complete", "ibp"), timeout=5)
    want = certify_batch(source, range(12), x, labels, opts)
    with torch.device("meta"):
        got = certify_batch(source, range(12), x, labels, opts)
    assert [(r.index, r.eps, r.method, r.result) for r in got] == [(r.index, r.eps, r.method, r.result) for r in want]
    assert {r.result for r in got} >= {"certified", "falsified", "misclassified"}


@needs_ray
def test_certify_ray_same_numbers(tmp_path, capsys, ray_session):
    model, data = certify_inputs(tmp_path)
    local, distributed = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert main(certify_argv(model, data, local)) == 0
    table = _table(capsys.readouterr().out)
    assert main(certify_argv(model, data, distributed, "crown,alpha-crown,complete", "--ray")) == 0
    assert _table(capsys.readouterr().out) == table
    rows = lambda p: sorted(list(csv.reader(p.open()))[1:])  # noqa: E731
    a, b = rows(local), rows(distributed)
    assert [r[:4] for r in a] == [r[:4] for r in b]  # every verdict
    for r, q in zip(a, b):  # margin bounds (the same computation; allow the last bits)
        assert r[4] == q[4] or math.isclose(float(r[4]), float(q[4]), rel_tol=1e-12)


# ---------------------------------------------------------------- distributed branch and bound

@needs_ray
def test_distributed_bab_same_verdicts(tmp_path, ray_session):
    from boundprop.bab import verify
    from boundprop.distributed import RayConfig
    from boundprop.distributed.ray_bab import BabPool

    model = relu_net(tmp_path / "net.onnx", seed=4)
    cases = {"(>= Y_0 1000)": "unsat", "(>= Y_0 -1000)": "sat"}
    with BabPool(model, config=RayConfig()) as pool:  # one set of actors for the four properties
        for k, cond in enumerate(["(<= Y_1 Y_2)", "(>= Y_2 1.5)", *cases]):
            prop = box_property(tmp_path / f"p{k}.vnnlib", [-1.0] * 4, [1.0] * 4, cond)
            local = verify(model, prop, timeout=30)
            dist = pool.verify(prop, timeout=60, parts=4, slice_s=2.0)
            assert dist.verdict == local.verdict == cases.get(cond, local.verdict)
            if dist.verdict == "sat":  # the counterexample lies in the box
                x, y = dist.counterexample
                assert bool((x.abs() <= 1.0).all())
            else:
                assert dist.stats["parts"] >= 4
        ray.kill(pool.actors[0])  # a worker dies: its sub-box goes to the other one, the verdict stands
        dist = pool.verify(tmp_path / "p2.vnnlib", timeout=60, parts=4, slice_s=2.0)
        assert dist.verdict == "unsat" and dist.stats["lost_workers"] == 1 and len(pool.actors) == 1
