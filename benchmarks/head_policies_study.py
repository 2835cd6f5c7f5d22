#!/usr/bin/env python
"""Forcing-KV and Dummy Forcing on the drift lab against full, sink + window, TokenTrim and Deep Forcing (issue 18,
"Compared").

Runs (or reads) ``cachepolicy compare`` of six policies on the lab's three study prompts x 8 seeds, 12 chunks, and
prints a Markdown table: per policy, each metric's mean and its paired difference from ``full`` (same prompt and
seed) with a 95% t interval, marked when the interval excludes 0 (the table and the plots of
``benchmarks/df_infinity_study.py``). ``forcing-kv`` runs with the head roles calibrated for the shipped lab weights
(``benchmarks/drift_lab_roles.json``, written by ``cachepolicy calibrate drift-lab --out
benchmarks/drift_lab_roles.json --chunks 4 --prompt "a yellow square and a blue disc bouncing slowly over a
navy-to-teal gradient"``) and 8 segments per frame (one token row of the 8x8 grid; the reference's 6 does not
divide 64 tokens), so ``round(3 x 8 x 0.33) = 8`` segments, one frame's worth, as in the reference.

    OMP_NUM_THREADS=1 python benchmarks/head_policies_study.py --out runs/head-policies        # ~2 h, 1 thread
    python benchmarks/head_policies_study.py --read-only --out runs/a runs/b --plots docs/img/head-policies
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from df_infinity_study import plot, table

POLICIES = [
    "full",
    "attention-sink:frames=3+sliding-window:frames=6",
    "attention-sink:frames=3+sliding-window:frames=6+tokentrim",
    "deep-forcing:window=12,sink=5,budget=9,recent=3",
    "forcing-kv:roles=benchmarks/drift_lab_roles.json,segments=8",
    "dummy-forcing",
]
PROMPTS = ("a red triangle bouncing slowly over a gray-to-purple gradient; "
           "two cyan discs bouncing slowly over an olive-to-maroon gradient; "
           "a white disc and a magenta triangle bouncing fast over a black-to-purple gradient")
PLOTS = ("latent-drift", "scene-histogram-drift", "scene-background-error", "cache-mb")


def run(out: Path) -> None:
    cli = Path(sys.executable).with_name("cachepolicy")
    subprocess.run([str(cli), "compare", "drift-lab", "--policies", "; ".join(POLICIES), "--prompts", PROMPTS,
                    "--seeds", "0-7", "--chunks", "12", "--out", str(out), "--no-progress"], check=True,
                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})


def present(outs: list[Path]) -> list[str]:
    """The policies of :data:`POLICIES` that have finished jobs in ``outs`` (in that order)."""
    found = {json.loads(line).get("policy") for out in outs for line in (out / "results.jsonl").read_text().splitlines()
             if line.strip() and json.loads(line).get("status") == "done"}
    return [policy for policy in POLICIES if policy in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, nargs="+", default=[Path("runs/head-policies")],
                        help="the compare folder (with --read-only: one or more, e.g. policies run separately)")
    parser.add_argument("--read-only", action="store_true", help="only print the table of existing runs")
    parser.add_argument("--plots", type=Path, default=None, help="also draw mean curves into this folder")
    args = parser.parse_args()
    if not args.read_only:
        run(args.out[0])
    policies = present(args.out)
    print(table(args.out, policies))
    if args.plots is not None:
        plot(args.out, args.plots, PLOTS, policies)


if __name__ == "__main__":
    main()
