#!/usr/bin/env bash
# The main job on the embedded default data: build a tiny model, save a checkpoint, inspect it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-demo}"
mkdir -p "$OUT"
CURVLAB=.venv/bin/curvlab
$CURVLAB init --preset tiny --seed 0 -o "$OUT/init.pt"
$CURVLAB info "$OUT/init.pt"
echo "demo: outputs in $OUT/"
