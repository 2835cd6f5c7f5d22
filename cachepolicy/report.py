"""The compare report: ``summary.json``, ``summary.md``, ``report.html`` with PNG plots and GIF videos.

Statistics: per policy and metric, the mean over jobs (prompts x seeds) and a 95% confidence interval
``mean +- t(0.975, n-1) * sd / sqrt(n)`` (Student's t; the interval is empty for a single job).
Everything the HTML refers to lies inside the folder, so it opens offline.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachepolicy.outputs import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

# two-sided 95% quantiles of Student's t for df = 1..30; beyond that the normal value is within 2%
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile(df: int) -> float:
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    return 1.96 + 2.4 / df  # within 0.2% of the exact quantile for df > 30


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% t-interval of ``values`` (NaNs are ignored)."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(clean)
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    mean = sum(clean) / n
    if n == 1:
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in clean) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def summarise(config: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s content: per policy (in the configuration's order), per metric, mean and CI."""
    policies: dict[str, Any] = {}
    for policy in config.policies:
        rows = [r for r in records if r["policy"] == policy]
        stats = {}
        for metric in config.metrics:
            s = mean_ci([r["metrics"].get(metric, math.nan) for r in rows])
            stats[metric] = {k: (_finite(v) if k != "n" else v) for k, v in s.items()}
        policies[policy] = {"jobs": len(rows), "metrics": stats}
    return {
        "config": config.to_json(),
        "fingerprint": config.fingerprint,
        "jobs_total": len(config.jobs()),
        "jobs_done": len(records),
        "policies": policies,
    }


def format_stat(stat: dict[str, Any]) -> str:
    """``mean ± half-width`` with 4 significant digits (the form used in summary.md and the HTML table)."""
    mean = stat.get("mean")
    if mean is None:
        return "n/a"
    low, high = stat.get("ci_low"), stat.get("ci_high")
    half = (high - low) / 2 if low is not None and high is not None else 0.0
    return f"{mean:.4g} ± {half:.2g}"


def summary_markdown(summary: dict[str, Any]) -> str:
    metrics = summary["config"]["metrics"]
    lines = [
        f"# Policy comparison: {summary['config']['model']}",
        "",
        f"{summary['jobs_done']} of {summary['jobs_total']} jobs; {len(summary['config']['prompts'])} prompt(s) x "
        f"{len(summary['config']['seeds'])} seed(s) per policy, {summary['config']['num_chunks']} chunks each. "
        "Cells: mean ± half-width of the 95% confidence interval over jobs.",
        "",
        "| policy | jobs | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for policy, data in summary["policies"].items():
        cells = [format_stat(data["metrics"][m]) for m in metrics]
        lines.append(f"| `{policy}` | {data['jobs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_curves(folder: Path, config: Any, records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cachepolicy.registry import get_registry

    registry = get_registry()
    plots = []
    (folder / "plots").mkdir(exist_ok=True)
    for metric in config.metrics:
        if not any(metric in r.get("curves", {}) for r in records):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for policy in config.policies:
            curves = [r["curves"][metric] for r in records if r["policy"] == policy and metric in r.get("curves", {})]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            data = np.array([c[:length] for c in curves], dtype=float)
            mean = data.mean(axis=0)
            x = np.arange(length)
            ax.plot(x, mean, label=policy, linewidth=1.6)
            if data.shape[0] > 1:
                half = t_quantile(data.shape[0] - 1) * data.std(axis=0, ddof=1) / math.sqrt(data.shape[0])
                ax.fill_between(x, mean - half, mean + half, alpha=0.2)
        cls = registry.metrics.get(metric)
        unit = f" ({cls.unit})" if cls is not None and cls.unit else ""
        ax.set_xlabel("chunk")
        ax.set_ylabel(metric + unit)
        ax.set_title(f"{metric}{': ' + cls.summary if cls is not None else ''}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"plots/{metric}.png"
        fig.savefig(folder / name)
        plt.close(fig)
        plots.append((metric, name))
    # TokenTrim trigger timeline: one row per job of each policy, a mark where it triggered
    triggers = [(r["policy"], r["prompt"], r["seed"], r["curves"].get("tokentrim-triggers", []))
                for r in records if any(r.get("curves", {}).get("tokentrim-triggers", []))]
    if triggers:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(triggers) + 1.2), dpi=100)
        for row, (policy, prompt, seed, curve) in enumerate(sorted(triggers)):
            chunks = [i for i, v in enumerate(curve) if v]
            ax.scatter(chunks, [row] * len(chunks), marker="|", s=120)
        ax.set_yticks(range(len(triggers)))
        ax.set_yticklabels([f"{p[:30]} | seed {s}" for p, _, s, _ in sorted(triggers)], fontsize=6)
        ax.set_xlabel("chunk")
        ax.set_title("TokenTrim triggers", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "plots/tokentrim-timeline.png")
        plt.close(fig)
        plots.append(("TokenTrim trigger timeline", "plots/tokentrim-timeline.png"))
    return plots


def _side_by_side(folder: Path, config: Any, records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import imageio.v3 as iio
    import numpy as np
    from PIL import Image, ImageDraw

    (folder / "videos").mkdir(exist_ok=True)
    videos = []
    by_key = {(r["policy"], r["prompt"], r["seed"]): r for r in records}
    for p_index, prompt in enumerate(config.prompts):
        for seed in config.seeds:
            panels, labels = [], []
            for policy in config.policies:
                record = by_key.get((policy, prompt, seed))
                path = folder / "jobs" / (record["job_id"] if record else "") / "preview.npy"
                if record is None or not path.is_file():
                    continue
                panels.append(np.load(path))
                labels.append(policy)
            if not panels:
                continue
            frames = min(p.shape[0] for p in panels)
            height = max(p.shape[1] for p in panels)
            label_h = 14
            strip = []
            for t in range(frames):
                row = []
                for panel, label in zip(panels, labels):
                    image = Image.new("RGB", (panel.shape[2], height + label_h), (255, 255, 255))
                    image.paste(Image.fromarray(panel[t]), (0, label_h))
                    ImageDraw.Draw(image).text((2, 1), label[: max(4, panel.shape[2] // 6)], fill=(0, 0, 0))
                    row.append(np.asarray(image))
                    row.append(np.full((height + label_h, 4, 3), 255, dtype=np.uint8))
                strip.append(np.concatenate(row[:-1], axis=1))
            name = f"videos/prompt{p_index}-seed{seed}.gif"
            atomic_write_bytes(folder / name, iio.imwrite("<bytes>", np.stack(strip), extension=".gif",
                                                          duration=125, loop=0))
            videos.append((f"prompt {p_index} ({prompt!r}), seed {seed}", name))
    return videos


def _html(summary: dict[str, Any], plots: list[tuple[str, str]], videos: list[tuple[str, str]],
          decoded: bool) -> str:
    metrics = summary["config"]["metrics"]
    esc = html.escape
    rows = []
    for policy, data in summary["policies"].items():
        cells = "".join(f"<td>{esc(format_stat(data['metrics'][m]))}</td>" for m in metrics)
        rows.append(f"<tr><td><code>{esc(policy)}</code></td><td>{data['jobs']}</td>{cells}</tr>")
    head = "".join(f"<th>{esc(m)}</th>" for m in metrics)
    plot_html = "".join(f'<figure><img src="{esc(src)}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption>'
                        f"</figure>" for title, src in plots)
    note = ("decoded frames" if decoded else
            "latent preview (the model has no decoder): first three latent channels, normalised per video")
    video_html = "".join(f'<figure><img src="{esc(src)}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption>'
                         f"</figure>" for title, src in videos)
    config = summary["config"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cachepolicy compare: {esc(config['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
figcaption {{ font-size: 0.8em; color: #555; max-width: 700px; }}
img {{ image-rendering: pixelated; max-width: 100%; }}
</style></head><body>
<h1>Policy comparison on <code>{esc(config['model'])}</code></h1>
<p>{summary['jobs_done']} of {summary['jobs_total']} jobs: {len(config['policies'])} policies x
{len(config['prompts'])} prompt(s) x {len(config['seeds'])} seed(s), {config['num_chunks']} chunks each.
Cells are mean ± half-width of the 95% confidence interval over jobs.
Data: <a href="summary.json">summary.json</a>, <a href="summary.md">summary.md</a>,
<a href="results.jsonl">results.jsonl</a>.</p>
<table id="summary"><thead><tr><th>policy</th><th>jobs</th>{head}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Metrics against chunk index</h2>
{plot_html}
<h2>Side by side</h2>
<p>Policies left to right in the order of the table; {esc(note)}.</p>
{video_html}
</body></html>
"""


def write_report(folder: str | Path, config: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write summary.json, summary.md, plots, videos and report.html into ``folder``; return the summary."""
    folder = Path(folder)
    summary = summarise(config, records)
    atomic_write_json(folder / "summary.json", summary)
    atomic_write_bytes(folder / "summary.md", summary_markdown(summary).encode())
    plots = _plot_curves(folder, config, records) if records else []
    videos = _side_by_side(folder, config, records) if records else []
    decoded = bool(records) and all(r.get("preview_decoded") for r in records)
    atomic_write_bytes(folder / "report.html", _html(summary, plots, videos, decoded).encode())
    logger.info("report written to %s", folder / "report.html")
    return summary
