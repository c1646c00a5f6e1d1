"""VNN-LIB parsing: boxes, output disjunctions, DNF, errors with line numbers."""

from pathlib import Path

import pytest
import torch

from boundprop.spec.vnnlib import VnnlibError, parse_vnnlib, read_vnnlib

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"

HEADER = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX = "(assert (>= X_0 -1))\n(assert (<= X_0 1.5e0))\n(assert (<= X_1 2))\n(assert (>= X_1 0))\n"


def test_box_and_conjunction():
    prop = parse_vnnlib(HEADER + BOX + "(assert (<= Y_0 Y_1))\n(assert (>= Y_0 3))\n")
    assert (prop.n_inputs, prop.n_outputs, len(prop.regions)) == (2, 2, 1)
    region = prop.regions[0]
    assert region.lower.tolist() == [-1, 0] and region.upper.tolist() == [1.5, 2]
    (d,) = region.disjuncts
    assert d.A.tolist() == [[1, -1], [-1, 0]] and d.b.tolist() == [0, -3]


def test_output_disjunction_and_input_regions():
    text = HEADER + BOX + "(assert (or (and (<= Y_0 0)) (and (>= Y_1 1) (<= Y_0 Y_1))))"
    prop = parse_vnnlib(text)
    assert len(prop.regions) == 1 and len(prop.regions[0].disjuncts) == 2
    text = HEADER + "(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_0 0))" \
                    " (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1) (<= Y_1 0))))"
    prop = parse_vnnlib(text)
    assert len(prop.regions) == 2
    assert prop.regions[1].lower.tolist() == [2, 0]


def test_linear_terms():
    prop = parse_vnnlib(HEADER + BOX + "(assert (<= (+ Y_0 (* 2 Y_1)) (- 3 Y_0)))")
    d = prop.regions[0].disjuncts[0]
    assert d.A.tolist() == [[2, 2]] and d.b.tolist() == [3]


@pytest.mark.parametrize("text,line", [
    (HEADER + "(assert (<= X_0 1)", 5),
    (HEADER + BOX + "(assert (<= Z_3 1))", 9),
    (HEADER + BOX + "(assert (xor (<= Y_0 1)))", 9),
    (HEADER + BOX + "\n\n(assert (<= X_0 Y_1))", 11),
])
def test_errors_name_the_line(text, line):
    with pytest.raises(VnnlibError, match=f"line {line}"):
        parse_vnnlib(text)


def test_unbounded_input_rejected():
    with pytest.raises(VnnlibError, match="X_1"):
        parse_vnnlib(HEADER + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (<= Y_0 0))")


@pytest.mark.skipif(not BENCH.exists(), reason="shared benchmarks not present")
def test_real_properties():
    p6 = read_vnnlib(BENCH / "acasxu" / "vnnlib" / "prop_6.vnnlib")
    assert p6.n_inputs == 5 and len(p6.regions) == 2
    mnist = read_vnnlib(sorted((BENCH / "mnist_fc" / "vnnlib").glob("*.vnnlib"))[0])
    assert mnist.n_inputs == 784 and mnist.n_outputs == 10
    assert len(mnist.regions[0].disjuncts) == 9
    assert torch.all(mnist.regions[0].lower <= mnist.regions[0].upper)
