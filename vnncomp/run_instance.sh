#!/usr/bin/env bash
# VNN-COMP: run_instance.sh v1 <benchmark_name> <onnx_path> <vnnlib_path> <results_file> <timeout_s>
# Runs `boundprop verify` with the repository's .venv; the result file gets
# sat (+ counterexample) / unsat / timeout / unknown.
set -uo pipefail

VERSION_STRING=v1
if [ "$#" -ne 6 ]; then
    echo "usage: $0 v1 <benchmark_name> <onnx_path> <vnnlib_path> <results_file> <timeout_s>" >&2
    exit 1
fi
if [ "$1" != "$VERSION_STRING" ]; then
    echo "run_instance.sh: expected version string $VERSION_STRING, got '$1'" >&2
    exit 1
fi
BENCHMARK="$2"
ONNX="$3"
VNNLIB="$4"
RESULTS="$5"
TIMEOUT="$6"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"

echo "running benchmark '$BENCHMARK': $ONNX $VNNLIB (timeout $TIMEOUT s) -> $RESULTS"
exec "$PY" -m boundprop.cli.main verify "$ONNX" "$VNNLIB" --timeout "$TIMEOUT" --result-file "$RESULTS"
