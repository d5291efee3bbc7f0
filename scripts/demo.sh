#!/usr/bin/env bash
# The main job on the embedded default data: train a tiny LLaMA-style model with Gauss-Newton
# -> checkpoints -> verify -> extract dense cross-layer GGN blocks -> spectra (also on 2
# processes under torchrun) -> preconditioner comparison -> figures.
# Outputs in $OUT (default demo/); every step is seeded, so the numbers repeat on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-demo}"
rm -rf "$OUT"
mkdir -p "$OUT"
CURVLAB=.venv/bin/curvlab

# 1. train: 6 outer Gauss-Newton steps (8 inner Muon/AdamW steps each), checkpoints every 3
$CURVLAB train --optimizer gn --preset tiny --seq-len 32 --micro-batch-size 4 \
    --inner-steps 8 --max-steps 6 --eval-every 3 --checkpoint-every 3 --seed 0 \
    --no-progress --out "$OUT/run"
CKPT="$OUT/run/final.pt"
$CURVLAB info "$CKPT"
# 2. check the curvature operators on this model (float64, against independent computations)
$CURVLAB verify "$CKPT"
# 3. dense GGN blocks of 2 query rows and 2 MLP rows in each layer, all pairs + coupling map
$CURVLAB extract "$CKPT" --seq-len 32 --batch-size 2 --pairs all --dtype float64 \
    --blocks 'q0=layers.0.self_attn.q_proj.weight[0:2]' \
    --blocks 'up0=layers.0.mlp.up_proj.weight[0:2]' \
    --blocks 'q1=layers.1.self_attn.q_proj.weight[0:2]' \
    --blocks 'up1=layers.1.mlp.up_proj.weight[0:2]' \
    -o "$OUT/blocks.h5"
$CURVLAB spectrum "$OUT/blocks.h5"                 # exact eigenvalues of the stored blocks
# 4. top eigenvalues and SLQ densities of the full and the block-diagonal (layerwise) GGN
$CURVLAB spectrum "$CKPT" --seq-len 32 --batch-size 2 --k 5 --blockdiag --density \
    --probes 2 --steps 30 -o "$OUT/spectra.h5"
# 4b. the same spectrum on 2 processes (torchrun, gloo): each takes 1 of the 2 rows, the
#     products are all-reduced; the eigenvalues equal the single-process ones
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 -m curvlab spectrum "$CKPT" \
    --seq-len 32 --batch-size 2 --k 5 -o "$OUT/spectra_2proc.h5" 2>/dev/null
.venv/bin/python - "$OUT/spectra.h5" "$OUT/spectra_2proc.h5" <<'PY'
import sys, h5py, numpy as np
from curvlab.store.spectrum import read_spectra
one, two = ([read_spectra(h5py.File(p))["ggn"]["full"]["eigenvalues"] for p in sys.argv[1:]])
print(f"top-5 GGN eigenvalues, 1 vs 2 processes: max rel. diff "
      f"{np.max(np.abs(two - one) / np.abs(one)):.1e}")
PY
# 5. full vs layerwise GN vs diagonal GN and the study's first-order baselines (SOAP, Muon)
#    at two checkpoints of the run
$CURVLAB compare "$OUT/run/step_000003.pt" "$CKPT" \
    --preconditioners full,layerwise,diag,soap,muon,identity \
    --damping 1e-2 --no-spectrum --seq-len 32 --batch-size 2 -o "$OUT/compare.h5"
# 6. figures
for f in blocks spectra compare; do $CURVLAB plot "$OUT/$f.h5" -o "$OUT/plots/$f"; done
echo "demo: outputs in $OUT/"
