"""A few seeds of each soundness fuzzer (:mod:`fuzz`): every case must hold (more with ``make test-all``;
long runs from the command line, see ``tests/fuzz.py``)."""

import pytest
from fuzz import KINDS, run

FAST = {"graph": range(6), "onnx": range(3), "onnxops": range(4), "inputs2": range(4), "weights": range(3),
        "jacobian": range(3), "verifier": range(2), "verifier_split": range(2)}
SLOW = {"graph": range(6, 40), "onnx": range(3, 30), "onnxops": range(4, 40), "inputs2": range(4, 40),
        "weights": range(3, 30), "jacobian": range(3, 30), "verifier": range(2, 20), "verifier_split": range(2, 20)}


def _cases(table: dict, slow: bool) -> list:
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(kind, seed, marks=marks, id=f"{kind}-{seed}") for kind in KINDS for seed in table[kind]]


@pytest.mark.parametrize("kind,seed", _cases(FAST, False) + _cases(SLOW, True))
def test_fuzz_case_holds(kind, seed):
    outcome = run(kind, seed)
    assert outcome.startswith(("ok", "unsupported", "skipped")), outcome
