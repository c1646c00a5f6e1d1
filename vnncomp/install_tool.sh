#!/usr/bin/env bash
# VNN-COMP: install_tool.sh v1
# Creates the virtual environment <repo>/.venv and installs boundprop (editable) with onnxruntime.
# Environment: PYTHON (default python3, >= 3.10); PIP_EXTRA_ARGS, e.g.
#   PIP_EXTRA_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" for a CPU-only torch.
set -euo pipefail

VERSION_STRING=v1
if [ "$#" -ge 1 ] && [ "$1" != "$VERSION_STRING" ]; then
    echo "install_tool.sh: expected version string $VERSION_STRING, got '$1'" >&2
    exit 1
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$REPO/.venv/bin/python" ]; then
    "$PYTHON" -m venv "$REPO/.venv"
fi
# shellcheck disable=SC2086
"$REPO/.venv/bin/python" -m pip install --upgrade pip ${PIP_EXTRA_ARGS:-}
# shellcheck disable=SC2086
"$REPO/.venv/bin/python" -m pip install ${PIP_EXTRA_ARGS:-} -e "$REPO" "onnxruntime>=1.16"
"$REPO/.venv/bin/python" -c "import boundprop, onnxruntime; print('boundprop installed:', boundprop.__file__)"
