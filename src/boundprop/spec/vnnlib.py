"""VNN-LIB property parser.

A VNN-LIB file declares inputs ``X_i`` and outputs ``Y_j`` (flattened, C order, batch dimension
dropped) and asserts a formula; the file describes a *violation*: the property holds (``unsat``)
when no input satisfies every assertion. The parser turns the formula into disjunctive normal form
and groups it as::

    violation  <=>  OR over regions r:  X in box_r  AND  OR over disjuncts d of r:  A_d Y <= b_d

which is the shape a bound-propagation verifier wants: for each input box, prove ``A_d Y > b_d``
for some row of every disjunct ``d`` (``unsat``), or find an ``X`` in the box with
``A_d Y <= b_d`` for some ``d`` (``sat``).

Supported syntax: ``declare-const``, ``assert``, ``and``, ``or``, and atoms ``(<= a b)``,
``(>= a b)``, ``(< a b)``, ``(> a b)`` (strict atoms are read as non-strict, which is sound for
``unsat`` claims) with ``a``/``b`` a variable or a number; linear terms ``(+ ...)``, ``(- ...)``
and ``(* c v)`` in output atoms. Errors name the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch


class VnnlibError(ValueError):
    """A malformed or unsupported VNN-LIB file; the message names the line."""


@dataclass
class Disjunct:
    """``A y <= b`` (all rows), ``A``: (rows, n_outputs), ``b``: (rows,)."""

    A: torch.Tensor
    b: torch.Tensor


@dataclass
class Region:
    """An input box and the output disjuncts that, with it, make a violation."""

    lower: torch.Tensor
    upper: torch.Tensor
    disjuncts: list[Disjunct] = field(default_factory=list)


@dataclass
class Property:
    n_inputs: int
    n_outputs: int
    regions: list[Region]
    source: str = ""


_TOKEN = re.compile(r"\(|\)|[^\s()]+")


@dataclass(frozen=True)
class _Tok:
    text: str
    line: int


def _tokens(text: str) -> list[_Tok]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split(";", 1)[0]
        out.extend(_Tok(m.group(0), number) for m in _TOKEN.finditer(line))
    return out


def _parse(tokens: list[_Tok]) -> list:
    """Tokens -> nested lists of tokens (s-expressions)."""
    stack: list[list] = [[]]
    opened: list[int] = []
    for tok in tokens:
        if tok.text == "(":
            stack.append([])
            opened.append(tok.line)
        elif tok.text == ")":
            if len(stack) == 1:
                raise VnnlibError(f"line {tok.line}: unbalanced ')'")
            done = stack.pop()
            opened.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    if len(stack) != 1:
        raise VnnlibError(f"line {opened[-1]}: '(' is never closed")
    return stack[0]


def _line(expr) -> int:
    if isinstance(expr, _Tok):
        return expr.line
    for item in expr:
        line = _line(item)
        if line:
            return line
    return 0


_VAR = re.compile(r"^([XY])_(\d+)$")


def _number(tok: _Tok) -> float | None:
    try:
        return float(tok.text)
    except ValueError:
        return None


class _Parser:
    def __init__(self) -> None:
        self.n_x = 0
        self.n_y = 0

    def declare(self, expr) -> None:
        if len(expr) != 3 or not isinstance(expr[1], _Tok):
            raise VnnlibError(f"line {_line(expr)}: malformed declare-const")
        match = _VAR.match(expr[1].text)
        if not match:
            raise VnnlibError(f"line {expr[1].line}: variables must be named X_i or Y_j, got {expr[1].text!r}")
        index = int(match.group(2)) + 1
        if match.group(1) == "X":
            self.n_x = max(self.n_x, index)
        else:
            self.n_y = max(self.n_y, index)

    def linear(self, expr) -> dict[str, float]:
        """A term -> {variable or '': coefficient}."""
        if isinstance(expr, _Tok):
            value = _number(expr)
            if value is not None:
                return {"": value}
            if not _VAR.match(expr.text):
                raise VnnlibError(f"line {expr.line}: unknown symbol {expr.text!r}")
            return {expr.text: 1.0}
        if not expr or not isinstance(expr[0], _Tok):
            raise VnnlibError(f"line {_line(expr)}: malformed term")
        op, args = expr[0].text, [self.linear(a) for a in expr[1:]]
        if op == "+":
            return _combine(args, [1.0] * len(args))
        if op == "-":
            if len(args) == 1:
                return _combine(args, [-1.0])
            return _combine(args, [1.0] + [-1.0] * (len(args) - 1))
        if op == "*":
            constants = [a[""] for a in args if set(a) == {""}]
            others = [a for a in args if set(a) != {""}]
            if len(others) > 1:
                raise VnnlibError(f"line {expr[0].line}: products of variables are not linear")
            scale = 1.0
            for c in constants:
                scale *= c
            return _combine(others or [{"": 1.0}], [scale])
        raise VnnlibError(f"line {expr[0].line}: unsupported operator {op!r} in a term")

    def formula(self, expr) -> list[list[tuple[dict[str, float], int]]]:
        """A formula -> DNF: list of clauses, each a list of atoms ``(terms, line)`` meaning terms <= 0."""
        if isinstance(expr, _Tok) or not expr or not isinstance(expr[0], _Tok):
            raise VnnlibError(f"line {_line(expr)}: expected a formula")
        op = expr[0].text
        if op == "and":
            return _conjoin(self.formula(sub) for sub in expr[1:])
        if op == "or":
            out: list[list] = []
            for sub in expr[1:]:
                out.extend(self.formula(sub))
            return out
        if op in ("<=", ">=", "<", ">"):
            if len(expr) != 3:
                raise VnnlibError(f"line {expr[0].line}: {op} takes two arguments")
            left, right = self.linear(expr[1]), self.linear(expr[2])
            terms = _combine([left, right], [1.0, -1.0] if op in ("<=", "<") else [-1.0, 1.0])
            return [[(terms, expr[0].line)]]
        raise VnnlibError(f"line {expr[0].line}: unsupported connective {op!r}")


def _conjoin(dnfs) -> list[list]:
    """AND of formulas in DNF; single-clause operands are appended in place (linear time)."""
    clauses: list[list] = [[]]
    for options in dnfs:
        if len(options) == 1:
            for clause in clauses:
                clause.extend(options[0])
        else:
            clauses = [c + o for c in clauses for o in options]
    return clauses


def _combine(terms: list[dict[str, float]], scales: list[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for term, scale in zip(terms, scales):
        for key, value in term.items():
            out[key] = out.get(key, 0.0) + scale * value
    return out


def parse_vnnlib(text: str, source: str = "") -> Property:
    """Parse VNN-LIB text into a :class:`Property`."""
    parser = _Parser()
    asserts = []
    for expr in _parse(_tokens(text)):
        if isinstance(expr, _Tok) or not expr or not isinstance(expr[0], _Tok):
            raise VnnlibError(f"line {_line(expr)}: expected (declare-const ...) or (assert ...)")
        head = expr[0].text
        if head == "declare-const":
            parser.declare(expr)
        elif head == "assert":
            if len(expr) != 2:
                raise VnnlibError(f"line {expr[0].line}: assert takes one formula")
            asserts.append(expr[1])
        elif head in ("set-logic", "set-info", "check-sat", "get-model", "exit"):
            continue
        else:
            raise VnnlibError(f"line {expr[0].line}: unsupported command {head!r}")
    if parser.n_x == 0 or parser.n_y == 0:
        raise VnnlibError("the file declares no X_i inputs or no Y_j outputs")
    clauses = _conjoin(parser.formula(formula) for formula in asserts)
    regions: dict[tuple, Region] = {}
    for clause in clauses:
        lower = [-float("inf")] * parser.n_x
        upper = [float("inf")] * parser.n_x
        rows, rhs = [], []
        for terms, line in clause:
            xs = [k for k in terms if k.startswith("X") and terms[k] != 0]
            ys = [k for k in terms if k.startswith("Y") and terms[k] != 0]
            const = terms.get("", 0.0)
            if xs and ys:
                raise VnnlibError(f"line {line}: constraints mixing inputs and outputs are not supported")
            if len(xs) > 1:
                raise VnnlibError(f"line {line}: only box constraints on inputs are supported")
            if xs:
                index, coeff = int(xs[0][2:]), terms[xs[0]]
                if index >= parser.n_x:
                    raise VnnlibError(f"line {line}: {xs[0]} is not declared")
                bound = -const / coeff  # coeff * x + const <= 0
                if coeff > 0:
                    upper[index] = min(upper[index], bound)
                else:
                    lower[index] = max(lower[index], bound)
            elif ys:
                row = [0.0] * parser.n_y
                for key in ys:
                    index = int(key[2:])
                    if index >= parser.n_y:
                        raise VnnlibError(f"line {line}: {key} is not declared")
                    row[index] = terms[key]
                rows.append(row)
                rhs.append(-const)
            elif const > 0:
                rows = None  # a constant false atom: this clause is unsatisfiable
                break
        if rows is None:
            continue
        unbounded = [i for i in range(parser.n_x) if lower[i] == -float("inf") or upper[i] == float("inf")]
        if unbounded:
            raise VnnlibError(f"X_{unbounded[0]} has no lower or upper bound in some clause (inputs must lie in a box)")
        if any(lo > hi for lo, hi in zip(lower, upper)):
            continue  # empty box: no violation here
        key = (tuple(lower), tuple(upper))
        if key not in regions:
            regions[key] = Region(torch.tensor(lower, dtype=torch.float64), torch.tensor(upper, dtype=torch.float64))
        region = regions[key]
        A = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), parser.n_y)
        region.disjuncts.append(Disjunct(A, torch.tensor(rhs, dtype=torch.float64)))
    return Property(parser.n_x, parser.n_y, list(regions.values()), source)


def read_vnnlib(path: str | Path) -> Property:
    """Parse a ``.vnnlib`` (or ``.vnnlib.gz``) file."""
    path = Path(path)
    if path.suffix == ".gz":
        import gzip

        text = gzip.open(path, "rt").read()
    else:
        text = path.read_text()
    try:
        return parse_vnnlib(text, str(path))
    except VnnlibError as err:
        raise VnnlibError(f"{path}: {err}") from None
