#!/usr/bin/env bash
# Set up, then run the main job: compare five cache policies on the embedded default model (the drift
# lab, trained here) and write a report (table, plots, side-by-side videos). Rerunning resumes; pass
# another folder as $1 to start anew.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# OpenMP's default wait policy (threads spin briefly between operations) runs this job 2.2x faster on an idle
# two-core machine than PASSIVE (264 s against 584 s, bit-identical results); on a machine shared with other
# jobs, OMP_WAIT_POLICY=PASSIVE ./scripts/demo.sh leaves them more CPU.
out="${1:-runs/compare}"
.venv/bin/cachepolicy compare drift-lab \
    --policies "full; attention-sink:frames=3+sliding-window:frames=6; infinity-rope:window=5,sink=1,flush_keep=1; forcing-kv:roles=benchmarks/drift_lab_roles.json,segments=8; dummy-forcing" \
    --prompts "a red triangle bouncing slowly over a gray-to-purple gradient; two cyan discs bouncing slowly over an olive-to-maroon gradient" \
    --seeds 0-3 --chunks 12 --out "$out"
echo "open $out/report.html (summary in $out/summary.md, raw results in $out/results.jsonl)"
