#!/usr/bin/env bash
# The main job end to end on the built-in synthetic world. Each stage adds its step here.
set -euo pipefail
OUT=${1:-demo-out}
BIN=.venv/bin
mkdir -p "$OUT"

echo "== 1. synthetic world"
$BIN/perceptio-curate synth --out "$OUT/world" --images 200 --seed 0
