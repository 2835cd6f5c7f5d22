"""Drift against chunk index from a ``cachepolicy compare`` folder: a table and a PNG.

For one policy (default ``full``) and each metric, the per-chunk mean over every job with a t-based 95%
confidence interval, and the trained context marked. Used for the drift-lab page::

    python benchmarks/drift_curve.py runs/lab-study --policy full --trained-chunks 4 \
        --out docs/img/drift-lab-full-curve.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

logger = logging.getLogger("drift_curve")

DEFAULT_METRICS = ("scene-histogram-drift", "scene-background-error", "scene-count-error", "latent-drift")


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% Student t quantile (scipy-free; exact table to 30 dof, normal beyond)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042]
    return table[dof - 1] if dof <= len(table) else 1.96


def per_chunk(results: list[dict], policy: str, metric: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean ``[chunks]`` and 95% half-width over the jobs of ``policy`` that have a curve for ``metric``."""
    curves = [r["curves"][metric] for r in results if r["policy"] == policy and metric in r.get("curves", {})]
    if not curves:
        raise SystemExit(f"no curves of {metric!r} for policy {policy!r} in these results")
    data = np.array(curves, dtype=float)
    mean = np.nanmean(data, axis=0)
    count = np.sum(~np.isnan(data), axis=0)
    std = np.nanstd(data, axis=0, ddof=1)
    half = np.array([t_quantile_975(int(n) - 1) * s / math.sqrt(n) if n > 1 else float("nan")
                     for s, n in zip(std, count)])
    return mean, half, len(curves)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a compare output folder (with results.jsonl)")
    ap.add_argument("--policy", default="full")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    ap.add_argument("--trained-chunks", type=int, default=4, help="the model's trained context, in chunks")
    ap.add_argument("--out", type=Path, default=None, help="PNG to write")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = [json.loads(line) for line in (args.folder / "results.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    series = {m: per_chunk(results, args.policy, m) for m in metrics}
    chunks = len(next(iter(series.values()))[0])
    header = "| chunk | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for c in range(chunks):
        cells = [f"{series[m][0][c]:.4f} ± {series[m][1][c]:.4f}" for m in metrics]
        lines.append(f"| {c}{' (trained)' if c < args.trained_chunks else ''} | " + " | ".join(cells) + " |")
    jobs = next(iter(series.values()))[2]
    print(f"policy {args.policy}: per-chunk mean ± 95% CI half-width over {jobs} jobs")
    print("\n".join(lines))
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2))
        for ax, metric in zip(np.atleast_1d(axes), metrics):
            mean, half, _ = series[metric]
            x = np.arange(chunks)
            ax.plot(x, mean, marker="o", ms=3)
            ax.fill_between(x, mean - half, mean + half, alpha=0.25)
            ax.axvspan(-0.5, args.trained_chunks - 0.5, color="grey", alpha=0.12, label="trained context")
            ax.set_title(metric, fontsize=9)
            ax.set_xlabel("chunk")
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.suptitle(f"{args.policy}: mean and 95% CI over {jobs} jobs", fontsize=10)
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
