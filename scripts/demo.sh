#!/usr/bin/env bash
# Set up, then run the main job: a rollout of the tiny-wan model under an attention sink + sliding window.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
out="${1:-runs/demo}"
.venv/bin/cachepolicy run tiny-wan \
    --policy "attention-sink:frames=3+sliding-window:frames=6" \
    --chunks 12 --seed 0 --prompt "a red square bouncing" --out "$out" --force
echo "outputs are in $out/ (latents.safetensors, trace.jsonl, run.json)"
