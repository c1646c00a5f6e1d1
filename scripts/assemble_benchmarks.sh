#!/usr/bin/env bash
# Rebuild BENCHMARKS.md from the result files the benchmark scripts write (benchmarks/results/*.md).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  cat benchmarks/README.md
  for part in peer_compare forward_unit conv_floor host_syncs verifier_syncs scaling memory zoo gpu_h100 training verifier verifier_relu_split weight_perturbation ray; do
    f="benchmarks/results/$part.md"
    [ -f "$f" ] || continue
    echo
    sed 's/^# /## /' "$f"
  done
} > BENCHMARKS.md
