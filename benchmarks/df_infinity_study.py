#!/usr/bin/env python
"""Deep Forcing and Infinity-RoPE on the drift lab against full, sink + window and TokenTrim (issue 17, "Compared").

Runs (or reads) one ``cachepolicy compare`` of five policies at the papers' settings scaled to the lab's
12 trained frames (docs "deep-forcing" and "infinity-rope" say how), 2 study prompts x 8 seeds, 12 chunks,
and prints a Markdown table: per policy, each metric's mean and its paired difference from ``full`` (same
prompt and seed) with a 95% t interval (scipy), marked when the interval excludes 0.

    OMP_NUM_THREADS=1 python benchmarks/df_infinity_study.py --out runs/df-infinity-study   # ~30 min, 1 thread
    python benchmarks/df_infinity_study.py --read-only --out runs/a runs/b                    # table only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

POLICIES = [
    "full",
    "attention-sink:frames=3+sliding-window:frames=6",
    "attention-sink:frames=3+sliding-window:frames=6+tokentrim:p=0.1",
    "deep-forcing:window=12,sink=5,budget=9,recent=3",
    "infinity-rope:window=5,sink=1,flush_keep=1",
]
PROMPTS = ("a red triangle bouncing slowly over a gray-to-purple gradient; "
           "two cyan discs bouncing slowly over an olive-to-maroon gradient")
METRICS = ["scene-histogram-drift", "scene-background-error", "scene-count-error", "scene-colour-error",
           "latent-drift", "flicker", "cache-mb", "seconds-per-chunk"]


def run(out: Path) -> None:
    cli = Path(sys.executable).with_name("cachepolicy")
    subprocess.run([str(cli), "compare", "drift-lab", "--policies", "; ".join(POLICIES), "--prompts", PROMPTS,
                    "--seeds", "0-7", "--chunks", "12", "--out", str(out), "--no-progress"], check=True,
                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})


def paired(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t half-width of paired differences."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def table(outs: list[Path], policies: list[str] = POLICIES) -> str:
    """Markdown: per policy of ``policies``, each metric's mean and its paired difference from ``full``."""
    jobs = [json.loads(line) for out in outs for line in (out / "results.jsonl").read_text().splitlines()
            if line.strip()]
    by = {}
    for job in jobs:
        if job.get("status") == "done":
            by.setdefault(job["policy"], {})[(job["prompt"], job["seed"])] = job["metrics"]
    base = by["full"]
    lines = ["| policy | jobs | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for policy in policies:
        runs = by.get(policy, {})
        cells = []
        for metric in METRICS:
            values = [m[metric] for m in runs.values()]
            mean = sum(values) / len(values) if values else math.nan
            cell = f"{mean:.4g}"
            if policy != "full":
                diff, half = paired([runs[k][metric] - base[k][metric] for k in runs if k in base])
                mark = "**" if not math.isnan(half) and abs(diff) > half else ""
                cell += f" ({mark}{diff:+.3g} ± {half:.2g}{mark})"
            cells.append(cell)
        lines.append(f"| `{policy}` | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(outs: list[Path], folder: Path, metrics: tuple[str, ...] = ("scene-background-error",
                                                                  "scene-histogram-drift", "cache-mb"),
         policies: list[str] = POLICIES) -> None:
    """Per metric, the mean curve over chunks of every policy of ``policies`` (all jobs of ``outs``) as
    ``folder/<metric>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [json.loads(line) for out in outs for line in (out / "results.jsonl").read_text().splitlines()
            if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    styles = ["-", "--", ":", "-", "-.", "--"]
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        for policy, style in zip(policies, styles):
            curves = [job["curves"][metric] for job in jobs if job["policy"] == policy and job.get("status") == "done"]
            if not curves:
                continue
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
            ax.plot(range(len(mean)), mean, style, label=f"{policy} ({len(curves)} jobs)", linewidth=1.6)
        ax.set_xlabel("chunk (the lab is trained on chunks 0-3)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
        fig.tight_layout()
        fig.savefig(folder / f"{metric}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, nargs="+", default=[Path("runs/df-infinity-study")],
                        help="the compare folder (with --read-only: one or more, e.g. the seeds run in halves)")
    parser.add_argument("--read-only", action="store_true", help="only print the table of existing runs")
    parser.add_argument("--plots", type=Path, default=None, help="also draw mean curves into this folder")
    args = parser.parse_args()
    if not args.read_only:
        run(args.out[0])
    print(table(args.out))
    if args.plots is not None:
        plot(args.out, args.plots)


if __name__ == "__main__":
    main()
