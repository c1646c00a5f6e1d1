"""Writing a benchmark's result file: the generated text, then the hand-written notes kept beside it.

Every script in ``benchmarks/`` writes ``results/<name>.md``; the analysis written by hand lives in
``results/<name>.notes.md`` and is appended, so that a rerun refreshes the figures and keeps the
prose (``scripts/assemble_benchmarks.sh`` then gathers the files into ``BENCHMARKS.md``).
"""

from __future__ import annotations

from pathlib import Path


def write_result(out: Path, text: str, echo: bool = False) -> None:
    """Write ``text`` and, after a blank line, the notes beside ``out`` (``<name>.notes.md``, if present)
    into ``out``; print the whole file if ``echo``."""
    notes = out.with_suffix(".notes.md")
    body = text.rstrip("\n") + "\n"
    if notes.exists():
        body += "\n" + notes.read_text().rstrip("\n") + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body)
    if echo:
        print(body)
