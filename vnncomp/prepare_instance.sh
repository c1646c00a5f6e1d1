#!/usr/bin/env bash
# VNN-COMP: prepare_instance.sh v1 <benchmark_name> <onnx_path> <vnnlib_path>
# No analysis: only checks that the network imports and the property parses (non-zero exit
# otherwise, which makes the runner skip the benchmark).
set -uo pipefail

VERSION_STRING=v1
if [ "$#" -ne 4 ]; then
    echo "usage: $0 v1 <benchmark_name> <onnx_path> <vnnlib_path>" >&2
    exit 1
fi
if [ "$1" != "$VERSION_STRING" ]; then
    echo "prepare_instance.sh: expected version string $VERSION_STRING, got '$1'" >&2
    exit 1
fi
BENCHMARK="$2"
ONNX="$3"
VNNLIB="$4"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"

echo "preparing benchmark '$BENCHMARK': $ONNX $VNNLIB"
"$PY" -c '
import sys
from boundprop.cli.loaders import CliError
from boundprop.cli.verify import load_inputs
try:
    load_inputs(sys.argv[1], sys.argv[2])
except CliError as err:
    sys.exit(f"prepare_instance: {err}")
' "$ONNX" "$VNNLIB"
