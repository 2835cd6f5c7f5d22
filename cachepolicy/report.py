"""The compare report: ``summary.json``, ``summary.md``, ``report.html`` with PNG plots and GIF videos.

Statistics: per (model, policy) and metric, the mean over jobs (prompts x seeds) and a 95% confidence
interval ``mean +- t(0.975, n-1) * sd / sqrt(n)`` (Student's t; the interval is empty for a single job).
With one model a row is labelled by its policy spec; with several, ``"<model>: <policy>"`` (summary.md and
the HTML table show the model in a column of its own). Everything the HTML refers to lies inside the
folder, so it opens offline.
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


def groups(config: Any) -> list[tuple[str, str, str]]:
    """``(label, model, policy)`` of each row of the report, model by model in the configuration's order:
    the label is the policy spec with one model, ``"<model>: <policy>"`` with several."""
    several = len(config.models) > 1
    return [(f"{model}: {policy}" if several else policy, model, policy)
            for model in config.models for policy in config.policies]


def finished(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of finished jobs (failed jobs have no metrics)."""
    return [r for r in records if r.get("status", "done") == "done"]


def failed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of failed jobs."""
    return [r for r in records if r.get("status", "done") == "failed"]


def record_model(record: dict[str, Any], config: Any) -> str:
    """The model of a results line (lines written before several models had no ``model``: the one model)."""
    return record.get("model", config.models[0])


def _rows(config: Any, records: list[dict[str, Any]], model: str, policy: str) -> list[dict[str, Any]]:
    return [r for r in records if r["policy"] == policy and record_model(r, config) == model]


def _summary_models(summary: dict[str, Any]) -> list[str]:
    config = summary["config"]
    return list(config["models"]) if "models" in config else [config["model"]]


def summarise(config: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s content: per (model, policy) in the configuration's order (keyed by the row's
    label, see :func:`groups`), per metric, mean and CI over the finished jobs; and the failed jobs."""
    done, failures = finished(records), failed(records)
    policies: dict[str, Any] = {}
    for label, model, policy in groups(config):
        rows = _rows(config, done, model, policy)
        stats = {}
        for metric in config.metrics:
            s = mean_ci([r["metrics"].get(metric, math.nan) for r in rows])
            stats[metric] = {k: (_finite(v) if k != "n" else v) for k, v in s.items()}
        policies[label] = {"model": model, "policy": policy, "jobs": len(rows), "metrics": stats}
    return {
        "config": config.to_json(),
        "fingerprint": config.fingerprint,
        "jobs_total": len(config.jobs()),
        "jobs_done": len(done),
        "jobs_failed": len(failures),
        "failed": [{"model": record_model(r, config), "policy": r["policy"], "prompt": r["prompt"], "seed": r["seed"],
                    "error": r["error"]} for r in failures],
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
    """The table of ``summary.md``; with several models the model has a column of its own."""
    metrics = summary["config"]["metrics"]
    models = _summary_models(summary)
    several = len(models) > 1
    lines = [
        f"# Policy comparison: {', '.join(models)}",
        "",
        f"{summary['jobs_done']} of {summary['jobs_total']} jobs; {len(summary['config']['prompts'])} prompt(s) x "
        f"{len(summary['config']['seeds'])} seed(s) per {'model and ' if several else ''}policy, "
        f"{summary['config']['num_chunks']} chunks each"
        + (f", recipe `{summary['config']['recipe']}`" if summary["config"].get("recipe") else "") + ". "
        "Cells: mean ± half-width of the 95% confidence interval over jobs.",
        "",
        ("| model " if several else "") + "| policy | jobs | " + " | ".join(metrics) + " |",
        ("|---" if several else "") + "|---|---|" + "---|" * len(metrics),
    ]
    for label, data in summary["policies"].items():
        cells = [format_stat(data["metrics"][m]) for m in metrics]
        first = f"| `{data['model']}` | `{data['policy']}` " if several else f"| `{label}` "
        lines.append(first + f"| {data['jobs']} | " + " | ".join(cells) + " |")
    if summary.get("failed"):
        lines += ["", f"## Failed jobs ({len(summary['failed'])}, not in the table; a rerun of the command tries them "
                      "again)", ""]
        lines += [f"* `{f['model']}` `{f['policy']}`, prompt {f['prompt']!r}, seed {f['seed']}: {f['error']}"
                  for f in summary["failed"]]
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
    # one line per (model, policy): the colour says the policy, the line style the model
    styles = ["-", "--", ":", "-."]
    for metric in config.metrics:
        if not any(metric in r.get("curves", {}) for r in records):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for label, model, policy in groups(config):
            curves = [r["curves"][metric] for r in _rows(config, records, model, policy)
                      if metric in r.get("curves", {})]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            data = np.array([c[:length] for c in curves], dtype=float)
            mean = data.mean(axis=0)
            x = np.arange(length)
            colour = f"C{list(config.policies).index(policy) % 10}"
            style = styles[list(config.models).index(model) % len(styles)]
            ax.plot(x, mean, label=label, linewidth=1.6, color=colour, linestyle=style)
            if data.shape[0] > 1:
                half = t_quantile(data.shape[0] - 1) * data.std(axis=0, ddof=1) / math.sqrt(data.shape[0])
                ax.fill_between(x, mean - half, mean + half, alpha=0.2, color=colour)
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
    # TokenTrim trigger timeline: one row per job of each (model,) policy, a mark where it triggered
    several = len(config.models) > 1
    triggers = sorted((record_model(r, config) if several else "", r["policy"], r["prompt"], r["seed"],
                       r["curves"].get("tokentrim-triggers", []))
                      for r in records if any(r.get("curves", {}).get("tokentrim-triggers", [])))
    if triggers:
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(triggers) + 1.2), dpi=100)
        for row, (_, _, _, _, curve) in enumerate(triggers):
            chunks = [i for i, v in enumerate(curve) if v]
            ax.scatter(chunks, [row] * len(chunks), marker="|", s=120)
        ax.set_yticks(range(len(triggers)))
        ax.set_yticklabels([f"{m + ': ' if m else ''}{p[:30]} | seed {s}" for m, p, _, s, _ in triggers],
                           fontsize=6)
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
    several = len(config.models) > 1
    by_key = {(record_model(r, config), r["policy"], r["prompt"], r["seed"]): r for r in records}
    for p_index, prompt in enumerate(config.prompts):
        for seed in config.seeds:
            panels, labels = [], []
            for _, model, policy in groups(config):
                record = by_key.get((model, policy, prompt, seed))
                path = folder / "jobs" / (record["job_id"] if record else "") / "preview.npy"
                if record is None or not path.is_file():
                    continue
                panel = _load_preview(path)
                if panel is None:
                    continue
                panels.append(panel)
                labels.append([model, policy] if several else [policy])  # one line of text each
            if not panels:
                continue
            frames = min(p.shape[0] for p in panels)
            height = max(p.shape[1] for p in panels)
            label_h = 2 + 12 * max(len(lines) for lines in labels)
            strip = []
            for t in range(frames):
                row = []
                for panel, label in zip(panels, labels):
                    image = Image.new("RGB", (panel.shape[2], height + label_h), (255, 255, 255))
                    image.paste(Image.fromarray(panel[t]), (0, label_h))
                    draw = ImageDraw.Draw(image)
                    for line_index, text in enumerate(label):
                        draw.text((2, 1 + 12 * line_index), text[: max(4, panel.shape[2] // 6)], fill=(0, 0, 0))
                    row.append(np.asarray(image))
                    row.append(np.full((height + label_h, 4, 3), 255, dtype=np.uint8))
                strip.append(np.concatenate(row[:-1], axis=1))
            name = f"videos/prompt{p_index}-seed{seed}.gif"
            atomic_write_bytes(folder / name, iio.imwrite("<bytes>", np.stack(strip), extension=".gif",
                                                          duration=125, loop=0))
            videos.append((f"prompt {p_index} ({prompt!r}), seed {seed}", name))
    return videos


def _load_preview(path: Path) -> Any:
    """A job's ``preview.npy`` (uint8 ``[T, H, W, 3]``), or None with a warning naming the file when it is
    damaged (the report is written without that panel)."""
    import numpy as np

    try:
        panel = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("%s is damaged (%s): left out of the side-by-side videos", path, exc)
        return None
    if panel.dtype != np.uint8 or panel.ndim != 4 or panel.shape[-1] != 3 or 0 in panel.shape:
        logger.warning("%s is damaged (uint8 [T, H, W, 3] frames expected, got %s %s): left out of the "
                       "side-by-side videos", path, panel.dtype, panel.shape)
        return None
    return panel


def _html(summary: dict[str, Any], plots: list[tuple[str, str]], videos: list[tuple[str, str]],
          decoded: bool | None) -> str:
    """``decoded``: True if every video shows decoded frames, False if none does, None if some do."""
    metrics = summary["config"]["metrics"]
    models = _summary_models(summary)
    several = len(models) > 1
    esc = html.escape
    rows = []
    for label, data in summary["policies"].items():
        cells = "".join(f"<td>{esc(format_stat(data['metrics'][m]))}</td>" for m in metrics)
        first = (f"<td><code>{esc(data['model'])}</code></td><td><code>{esc(data['policy'])}</code></td>"
                 if several else f"<td><code>{esc(label)}</code></td>")
        rows.append(f"<tr>{first}<td>{data['jobs']}</td>{cells}</tr>")
    head = ("<th>model</th>" if several else "") + "<th>policy</th><th>jobs</th>"
    head += "".join(f"<th>{esc(m)}</th>" for m in metrics)
    plot_html = "".join(f'<figure><img src="{esc(src)}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption>'
                        f"</figure>" for title, src in plots)
    latent_note = "first three latent channels, normalised per video"
    note = ("decoded frames" if decoded else
            f"latent preview (the model has no decoder): {latent_note}" if decoded is False else
            f"decoded frames where the model has a decoder, else a latent preview: {latent_note}")
    failed_html = ""
    if summary.get("failed"):
        items = "".join(f"<li><code>{esc(f['model'])}</code> <code>{esc(f['policy'])}</code>, prompt "
                        f"{esc(repr(f['prompt']))}, seed {f['seed']}: {esc(f['error'])}</li>" for f in summary["failed"])
        failed_html = (f"<h2>Failed jobs</h2><p>{len(summary['failed'])} jobs failed; they are not in the table, and "
                       f"a rerun of the command tries them again.</p><ul>{items}</ul>")
    video_html = "".join(f'<figure><img src="{esc(src)}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption>'
                         f"</figure>" for title, src in videos)
    config = summary["config"]
    grid = (f"{len(models)} models x " if several else "") + f"{len(config['policies'])} policies x"
    order = "Models and policies" if several else "Policies"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cachepolicy compare: {esc(', '.join(models))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
figcaption {{ font-size: 0.8em; color: #555; max-width: 700px; }}
img {{ image-rendering: pixelated; max-width: 100%; }}
</style></head><body>
<h1>Policy comparison on {', '.join(f'<code>{esc(m)}</code>' for m in models)}</h1>
<p>{summary['jobs_done']} of {summary['jobs_total']} jobs: {grid}
{len(config['prompts'])} prompt(s) x {len(config['seeds'])} seed(s), {config['num_chunks']} chunks each.
Cells are mean ± half-width of the 95% confidence interval over jobs.
Data: <a href="summary.json">summary.json</a>, <a href="summary.md">summary.md</a>,
<a href="results.jsonl">results.jsonl</a>.</p>
<table id="summary"><thead><tr>{head}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
{failed_html}
<h2>Metrics against chunk index</h2>
{plot_html}
<h2>Side by side</h2>
<p>{order} left to right in the order of the table; {esc(note)}.</p>
{video_html}
</body></html>
"""


def write_report(folder: str | Path, config: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write summary.json, summary.md, plots, videos and report.html into ``folder``; return the summary."""
    folder = Path(folder)
    summary = summarise(config, records)
    records = finished(records)
    atomic_write_json(folder / "summary.json", summary)
    atomic_write_bytes(folder / "summary.md", summary_markdown(summary).encode())
    plots = _plot_curves(folder, config, records) if records else []
    videos = _side_by_side(folder, config, records) if records else []
    flags = {bool(r.get("preview_decoded")) for r in records}
    decoded = flags == {True} if len(flags) < 2 else None
    atomic_write_bytes(folder / "report.html", _html(summary, plots, videos, decoded).encode())
    logger.info("report written to %s", folder / "report.html")
    return summary
