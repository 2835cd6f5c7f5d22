"""The compare report: ``summary.json``, ``summary.md``, ``report.html`` with PNG plots and GIF videos.

Statistics (:mod:`cachepolicy.stats`): per (model, policy) and metric, the mean over jobs (prompts x seeds)
with its 95% Student's t interval; and per policy other than the baseline
(:func:`~cachepolicy.compare.checks.baseline_policy`), the paired difference from the baseline (pairs: the
same model, prompt and seed, hence the same noise) with its 95% interval and a paired t-test. A difference
is *resolved* when its interval excludes 0.

A metric is shown for the rows whose policies it applies to (:attr:`~cachepolicy.metrics.Metric.for_policies`),
and its column only when it applies to one of them. The policies' own numeric trace fields (what their
``chunk_end`` returns, recorded in ``results.jsonl`` as ``trace_fields``) are summarised like metrics.

With one model a row is labelled by its policy spec; with several, ``"<model>: <policy>"`` (summary.md and
the HTML table show the model in a column of its own). Everything the HTML refers to lies inside the
folder, so it opens offline.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cachepolicy.outputs import atomic_write_bytes, atomic_write_json
from cachepolicy.stats import mean_ci, paired_difference, t_quantile

logger = logging.getLogger(__name__)

#: what a metric whose plugin is not installed where the report is written is taken to be
_UNKNOWN_METRIC = {"summary": "", "unit": "", "higher_is_better": None, "range": [None, None], "for_policies": []}


def _json_stat(values: Sequence[float | None]) -> dict[str, Any]:
    """:func:`~cachepolicy.stats.mean_ci` of ``values`` with None for NaN."""
    return {k: (None if k != "n" and math.isnan(v) else v) for k, v in mean_ci(values).items()}


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


def metric_info(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per metric: ``summary``, ``unit``, ``higher_is_better``, ``range`` (``[low, high]``, None unbounded)
    and ``for_policies``, as its class declares them."""
    from cachepolicy.registry import get_registry

    registry = get_registry()
    info = {}
    for name in names:
        cls = registry.metrics.get(name)
        info[name] = dict(_UNKNOWN_METRIC) if cls is None else {
            "summary": cls.summary, "unit": cls.unit, "higher_is_better": cls.higher_is_better,
            "range": list(cls.value_range), "for_policies": list(cls.for_policies)}
    return info


def _policy_names(config: Any, rows: Sequence[Mapping[str, Any]], policy: str) -> set[str]:
    """The names of the policies a row runs: from its results lines' ``policy_resolved``, else the spec
    (with the recipe's policies) as the registry builds it, else the spec's terms."""
    for record in rows:
        if isinstance(record.get("policy_resolved"), str):
            return {term.split(":")[0].strip() for term in record["policy_resolved"].split("+")}
    from cachepolicy.compare.checks import recipe_specs
    from cachepolicy.errors import CachePolicyError

    try:
        from cachepolicy.api import build_policies

        return {p.name for p in build_policies(*recipe_specs(config.recipe, policy))}
    except CachePolicyError:
        return {term.split(":")[0].strip() for term in policy.split("+")}


def summarise(config: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s content: per (model, policy) in the configuration's order (keyed by the row's
    label, see :func:`groups`): per metric, mean and CI over the finished jobs; the paired difference from
    the baseline of its model (``paired``, None for the baseline itself); the summary of its policies'
    trace fields; and the failed jobs."""
    from cachepolicy.compare.checks import baseline_policy

    baseline = baseline_policy(config)
    info = metric_info(config.metrics)
    done, failures = finished(records), failed(records)
    rows_of = {(model, policy): _rows(config, done, model, policy) for _, model, policy in groups(config)}
    policies: dict[str, Any] = {}
    for label, model, policy in groups(config):
        rows = rows_of[(model, policy)]
        names = _policy_names(config, rows, policy)
        not_applicable = [m for m in config.metrics
                          if info[m]["for_policies"] and not names & set(info[m]["for_policies"])]
        stats = {metric: _json_stat([r["metrics"].get(metric) for r in rows]) for metric in config.metrics}
        keys = dict.fromkeys(key for r in rows for key in r.get("trace_fields", {}))
        fields = {key: _json_stat([r.get("trace_fields", {}).get(key, {}).get("value") for r in rows]) for key in keys}
        policies[label] = {"model": model, "policy": policy, "jobs": len(rows), "metrics": stats,
                           "metrics_not_applicable": not_applicable, "paired": None, "trace_fields": fields}
    for label, model, policy in groups(config):  # each policy against the baseline of its model
        if policy == baseline:
            continue
        base_label = next(lbl for lbl, m, p in groups(config) if m == model and p == baseline)
        skip = set(policies[label]["metrics_not_applicable"]) | set(policies[base_label]["metrics_not_applicable"])
        base = {(r["prompt"], r["seed"]): r for r in rows_of[(model, baseline)]}
        pairs = [(r, base[(r["prompt"], r["seed"])]) for r in rows_of[(model, policy)]
                 if (r["prompt"], r["seed"]) in base]
        policies[label]["paired"] = {
            metric: None if metric in skip else paired_difference(
                [r["metrics"].get(metric) for r, _ in pairs], [b["metrics"].get(metric) for _, b in pairs])
            for metric in config.metrics}
    return {
        "config": config.to_json(),
        "fingerprint": config.fingerprint,
        "jobs_total": len(config.jobs()),
        "jobs_done": len(done),
        "jobs_failed": len(failures),
        "failed": [{"model": record_model(r, config), "policy": r["policy"], "prompt": r["prompt"], "seed": r["seed"],
                    "error": r["error"]} for r in failures],
        "baseline": baseline,
        "metric_info": info,
        "policies": policies,
    }


# ----------------------------------------------------------------------------------------- formatting
def format_stat(stat: dict[str, Any]) -> str:
    """``mean ± half-width`` with 4 significant digits (the form used in summary.md and the HTML table)."""
    mean = stat.get("mean")
    if mean is None:
        return "n/a"
    low, high = stat.get("ci_low"), stat.get("ci_high")
    half = (high - low) / 2 if low is not None and high is not None else 0.0
    return f"{mean:.4g} ± {half:.2g}"


def format_difference(diff: dict[str, Any] | None) -> str:
    """A paired difference as ``+mean ± half-width`` (``n/a`` without pairs, ``+mean (1 pair)`` with one)."""
    if diff is None or diff.get("mean") is None:
        return "n/a"
    if diff.get("ci_low") is None:
        return f"{diff['mean']:+.3g} ({diff['n']} pair)"
    return f"{diff['mean']:+.3g} ± {(diff['ci_high'] - diff['ci_low']) / 2:.2g}"


def verdict(diff: dict[str, Any] | None, higher_is_better: bool | None) -> str:
    """``"better"``, ``"worse"`` or ``"differs"`` (a metric without a direction) for a difference resolved at
    95%, else ``""``."""
    if not diff or not diff.get("resolved"):
        return ""
    if higher_is_better is None:
        return "differs"
    return "better" if (diff["mean"] > 0) == higher_is_better else "worse"


def direction(higher_is_better: bool | None) -> str:
    return {True: "higher is better", False: "lower is better"}.get(higher_is_better, "no better direction")


def _arrow(higher_is_better: bool | None) -> str:
    return {True: " ↑", False: " ↓"}.get(higher_is_better, "")


def _range_text(value_range: Sequence[float | None]) -> str:
    low, high = value_range
    if low is None and high is None:
        return "any"
    if high is None:
        return f"≥ {low:g}"
    if low is None:
        return f"≤ {high:g}"
    return f"{low:g} to {high:g}"


def _paired_cells(data: Mapping[str, Any], metrics: Sequence[str],
                  info: Mapping[str, Any]) -> list[tuple[dict[str, Any] | None, str]]:
    """``(paired difference or None where it does not apply, verdict)`` of a row, per metric."""
    return [(diff, verdict(diff, info[m]["higher_is_better"])) for m in metrics
            for diff in [data["paired"].get(m)]]


def _pairs(data: Mapping[str, Any]) -> int:
    """The pairs of a row (the most of any metric)."""
    return max((d["n"] for d in data["paired"].values() if d), default=0)


def shown_metrics(summary: dict[str, Any]) -> list[str]:
    """The metrics that apply to at least one row (the columns of the tables)."""
    rows = list(summary["policies"].values())
    return [m for m in summary["config"]["metrics"]
            if not rows or any(m not in data.get("metrics_not_applicable", ()) for data in rows)]


def trace_field_names(summary: dict[str, Any]) -> list[str]:
    """Every policy trace field of the summary, in the order first met."""
    names: dict[str, None] = {}
    for data in summary["policies"].values():
        names.update(dict.fromkeys(data.get("trace_fields", {})))
    return list(names)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The tables of ``summary.md``; with several models the model has a column of its own."""
    metrics = shown_metrics(summary)
    info = summary.get("metric_info") or {m: _UNKNOWN_METRIC for m in metrics}
    models = _summary_models(summary)
    several = len(models) > 1
    config = summary["config"]

    def first(label: str, data: dict[str, Any]) -> str:
        return f"| `{data['model']}` | `{data['policy']}` " if several else f"| `{label}` "

    def header(names: Sequence[str], info_of: Mapping[str, Any], count: str = "jobs") -> list[str]:
        cells = [f"{n}{_arrow(info_of[n]['higher_is_better'])}" + (f" ({info_of[n]['unit']})"
                                                                  if info_of[n]["unit"] else "") for n in names]
        return [("| model " if several else "") + f"| policy | {count} | " + " | ".join(cells) + " |",
                ("|---" if several else "") + "|---|---|" + "---|" * len(names)]

    lines = [
        f"# Policy comparison: {', '.join(models)}",
        "",
        f"{summary['jobs_done']} of {summary['jobs_total']} jobs; {len(config['prompts'])} prompt(s) x "
        f"{len(config['seeds'])} seed(s) per {'model and ' if several else ''}policy, "
        f"{config['num_chunks']} chunks each"
        + (f", recipe `{config['recipe']}`" if config.get("recipe") else "") + ". "
        "Cells: mean ± half-width of the 95% confidence interval over jobs; ↓ lower is better, ↑ higher is "
        "better; — the metric does not apply to the policy.",
        "",
        *header(metrics, info),
    ]
    for label, data in summary["policies"].items():
        cells = ["—" if m in data.get("metrics_not_applicable", ()) else format_stat(data["metrics"][m])
                 for m in metrics]
        lines.append(first(label, data) + f"| {data['jobs']} | " + " | ".join(cells) + " |")
    paired = [(label, data) for label, data in summary["policies"].items() if data.get("paired")]
    if paired:
        lines += ["", f"## Paired difference from `{summary['baseline']}`", "",
                  f"Per {'model, ' if several else ''}prompt and seed (the same noise), policy minus "
                  f"`{summary['baseline']}`: mean ± half-width of the 95% confidence interval over the pairs. "
                  "**Bold**: resolved at 95% (the interval excludes 0; paired t-test p < 0.05), marked better or "
                  "worse by the metric's direction.", "", *header(metrics, info, "pairs")]
        for label, data in paired:
            cells = ["—" if diff is None else f"**{format_difference(diff)}** {word}" if word
                     else format_difference(diff) for diff, word in _paired_cells(data, metrics, info)]
            lines.append(first(label, data) + f"| {_pairs(data)} | " + " | ".join(cells) + " |")
    fields = trace_field_names(summary)
    if fields:
        lines += ["", "## Policies' own trace fields", "",
                  "Numeric fields a policy returns from `chunk_end` (bools count 1 when true): per job the mean "
                  "over chunks; cells: mean ± half-width of the 95% confidence interval over jobs.", "",
                  ("| model " if several else "") + "| policy | jobs | " + " | ".join(fields) + " |",
                  ("|---" if several else "") + "|---|---|" + "---|" * len(fields)]
        for label, data in summary["policies"].items():
            if data.get("trace_fields"):
                cells = [format_stat(data["trace_fields"][f]) if f in data["trace_fields"] else "—" for f in fields]
                lines.append(first(label, data) + f"| {data['jobs']} | " + " | ".join(cells) + " |")
    lines += ["", "## Metrics", ""]
    lines += [f"* `{m}`: {info[m]['summary'] or 'no description'}; {direction(info[m]['higher_is_better'])}; "
              f"unit: {info[m]['unit'] or 'none'}; values: {_range_text(info[m]['range'])}" for m in metrics]
    hidden = [m for m in config["metrics"] if m not in metrics]
    if hidden:
        lines += ["", f"Not shown, as they apply to none of the compared policies: "
                      f"{', '.join(f'`{m}`' for m in hidden)}."]
    if summary.get("failed"):
        lines += ["", f"## Failed jobs ({len(summary['failed'])}, not in the tables; a rerun of the command tries "
                      "them again)", ""]
        lines += [f"* `{f['model']}` `{f['policy']}`, prompt {f['prompt']!r}, seed {f['seed']}: {f['error']}"
                  for f in summary["failed"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- plots
#: one line per (model, policy): colour and marker say the policy; the line style the policy (one model)
#: or the model (several)
_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def line_style(config: Any, model: str, policy: str) -> dict[str, Any]:
    """The matplotlib style of a row's line: colour and marker by policy, line style by policy (one model)
    or by model (several), markers placed at different chunks per policy so coinciding lines stay visible."""
    index = list(config.policies).index(policy)
    style_index = list(config.models).index(model) if len(config.models) > 1 else index
    return {"color": f"C{index % 10}", "marker": _MARKERS[index % len(_MARKERS)],
            "linestyle": _STYLES[style_index % len(_STYLES)], "marker_offset": index}


def curve_band(curves: Sequence[Sequence[float | None]],
               value_range: Sequence[float | None] = (None, None)) -> tuple[Any, Any, Any]:
    """``(mean, low, high)`` per chunk over jobs' ``curves`` (cut to the shortest; None and NaN left out):
    the mean and its 95% t interval, clipped to ``value_range``; NaN where fewer than two values."""
    import numpy as np

    length = min(len(c) for c in curves)
    data = np.array([[math.nan if v is None else v for v in c[:length]] for c in curves], dtype=float)
    count = np.sum(~np.isnan(data), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(data, axis=0) / count
        sd = np.sqrt(np.nansum((data - mean) ** 2, axis=0) / (count - 1))
        half = np.array([t_quantile(int(n) - 1) for n in count]) * sd / np.sqrt(count)
    low, high = mean - half, mean + half
    for bound, limit in zip(value_range, (np.maximum, np.minimum)):
        if bound is not None:
            low, high = limit(low, bound), limit(high, bound)
    return mean, low, high


def _curve_plot(path: Path, config: Any, series: Sequence[tuple[str, str, str, list[list[float | None]]]], *,
                title: str, ylabel: str, value_range: Sequence[float | None]) -> None:
    """One line per ``(label, model, policy, curves)`` (mean over jobs) with its 95% band, clipped to
    ``value_range``; the legend below the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.0, 3.4 + 0.2 * len(series)), dpi=100)
    for label, model, policy, curves in series:
        mean, low, high = curve_band(curves, value_range)
        x = np.arange(len(mean))
        style = line_style(config, model, policy)
        step = max(1, len(mean) // 6)
        ax.plot(x, mean, label=label, linewidth=1.5, color=style["color"], linestyle=style["linestyle"],
                alpha=0.9, marker=style["marker"], markersize=5, markevery=(style["marker_offset"] % step, step))
        if not np.all(np.isnan(low)):
            ax.fill_between(x, low, high, alpha=0.12, color=style["color"], linewidth=0)
    ax.set_xlabel("chunk")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_curves(folder: Path, config: Any, records: list[dict[str, Any]],
                 summary: dict[str, Any]) -> list[tuple[str, str]]:
    """A plot per metric shown and per policy trace field, and the TokenTrim trigger timeline."""
    (folder / "plots").mkdir(exist_ok=True)
    info = summary["metric_info"]
    plots = []
    for metric in shown_metrics(summary):
        series = []
        for label, model, policy in groups(config):
            if metric in summary["policies"][label]["metrics_not_applicable"]:
                continue
            curves = [r["curves"][metric] for r in _rows(config, records, model, policy)
                      if metric in r.get("curves", {})]
            if curves:
                series.append((label, model, policy, curves))
        if not series:
            continue
        meta = info[metric]
        title = (f"{metric} ({direction(meta['higher_is_better'])})"
                 + (f"\n{meta['summary']}" if meta["summary"] else ""))
        name = f"plots/{metric}.png"
        _curve_plot(folder / name, config, series, title=title, value_range=meta["range"],
                    ylabel=metric + (f" ({meta['unit']})" if meta["unit"] else ""))
        plots.append((f"{metric}: {direction(meta['higher_is_better'])}", name))
    for field in trace_field_names(summary):
        series, value_range = [], (None, None)
        for label, model, policy in groups(config):
            found = [r["trace_fields"][field] for r in _rows(config, records, model, policy)
                     if field in r.get("trace_fields", {})]
            if found:
                series.append((label, model, policy, [f["per_chunk"] for f in found]))
                value_range = found[0]["range"]
        name = f"plots/trace-{re.sub(r'[^A-Za-z0-9._-]', '_', field)}.png"
        _curve_plot(folder / name, config, series, title=f"{field}: a policy's own trace field",
                    ylabel=field, value_range=value_range)
        plots.append((f"{field} (policy trace field)", name))
    timeline = _trigger_timeline(folder, config, records)
    if timeline:
        plots.append(timeline)
    return plots


def _trigger_timeline(folder: Path, config: Any, records: list[dict[str, Any]]) -> tuple[str, str] | None:
    """TokenTrim's triggers: one row per job of each (model,) policy, a mark where it triggered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len(config.models) > 1
    triggers = sorted((record_model(r, config) if several else "", r["policy"], config.prompts.index(r["prompt"])
                       if r["prompt"] in config.prompts else -1, r["seed"], r["curves"].get("tokentrim-triggers", []))
                      for r in records if any(r.get("curves", {}).get("tokentrim-triggers", [])))
    if not triggers:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(triggers) + 1.2), dpi=100)
    for row, (*_, curve) in enumerate(triggers):
        chunks = [i for i, v in enumerate(curve) if v]
        ax.scatter(chunks, [row] * len(chunks), marker="|", s=120, color="C3")
    ax.set_yticks(range(len(triggers)))
    ax.set_yticklabels([f"{m + ': ' if m else ''}{p} | prompt {i} seed {s}" for m, p, i, s, _ in triggers],
                       fontsize=6)
    ax.set_xlim(-0.5, config.num_chunks - 0.5)
    ax.set_xlabel("chunk")
    ax.set_title("TokenTrim triggers (one row per job that triggered)", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "plots/tokentrim-timeline.png")
    plt.close(fig)
    return ("TokenTrim trigger timeline", "plots/tokentrim-timeline.png")


# ----------------------------------------------------------------------------------------- videos
def _wrap_label(text: str, width: int, draw: Any) -> list[str]:
    """``text`` in lines of at most ``width`` pixels: a composed spec breaks before each ``+``, then where
    a term is still too long."""
    lines = []
    terms = text.split("+")
    for index, term in enumerate(terms):
        rest = ("+" if index else "") + term
        while rest:
            cut = len(rest)
            while cut > 1 and draw.textlength(rest[:cut]) > width:
                cut -= 1
            lines.append(rest[:cut])
            rest = rest[cut:]
    return lines


def _side_by_side(folder: Path, config: Any, records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """One GIF per prompt and seed with every (model,) policy side by side, each labelled with its full
    spec; returns ``(title, path, left-to-right labels)``."""
    import imageio.v3 as iio
    import numpy as np
    from PIL import Image, ImageDraw

    (folder / "videos").mkdir(exist_ok=True)
    videos = []
    several = len(config.models) > 1
    by_key = {(record_model(r, config), r["policy"], r["prompt"], r["seed"]): r for r in records}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = 12
    for p_index, prompt in enumerate(config.prompts):
        for seed in config.seeds:
            panels, labels = [], []
            for label, model, policy in groups(config):
                record = by_key.get((model, policy, prompt, seed))
                path = folder / "jobs" / (record["job_id"] if record else "") / "preview.npy"
                if record is None or not path.is_file():
                    continue
                panel = _load_preview(path)
                if panel is None:
                    continue
                panels.append(panel)
                width = panel.shape[2] - 4
                lines = (_wrap_label(model, width, measure) if several else []) + _wrap_label(policy, width, measure)
                labels.append((label, lines))
            if not panels:
                continue
            frames = min(p.shape[0] for p in panels)
            height = max(p.shape[1] for p in panels)
            label_h = 4 + line_h * max(len(lines) for _, lines in labels)
            strip = []
            for t in range(frames):
                row = []
                for panel, (_, lines) in zip(panels, labels):
                    image = Image.new("RGB", (panel.shape[2], height + label_h), (255, 255, 255))
                    image.paste(Image.fromarray(panel[t]), (0, label_h))
                    draw = ImageDraw.Draw(image)
                    for line_index, text in enumerate(lines):
                        draw.text((2, 1 + line_h * line_index), text, fill=(0, 0, 0))
                    row.append(np.asarray(image))
                    row.append(np.full((height + label_h, 6, 3), 255, dtype=np.uint8))
                strip.append(np.concatenate(row[:-1], axis=1))
            name = f"videos/prompt{p_index}-seed{seed}.gif"
            atomic_write_bytes(folder / name, iio.imwrite("<bytes>", np.stack(strip), extension=".gif",
                                                          duration=125, loop=0))
            videos.append((f"prompt {p_index} ({prompt!r}), seed {seed}", name,
                           " | ".join(label for label, _ in labels)))
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


# ----------------------------------------------------------------------------------------- HTML
def _spec_html(spec: str) -> str:
    """A spec in ``<code>``: each ``+`` term kept on one line where it fits; a term too long for its column
    breaks after its ``:`` and between its parameters (after a ``,``), never inside a name or a value."""
    terms = spec.split("+")

    def term(text: str) -> str:
        return html.escape(text).replace(":", ":<wbr>").replace(",", ",<wbr>")

    return ("<code>" + "".join(f'<span class="term">{"+" if i else ""}{term(t)}</span>'
                               for i, t in enumerate(terms)) + "</code>")


def _stat_html(text: str) -> str:
    """``mean ± half`` on two lines."""
    mean, sep, half = text.partition(" ± ")
    return html.escape(mean) + (f'<br><span class="pm">± {html.escape(half)}</span>' if sep else "")


def _html(summary: dict[str, Any], plots: list[tuple[str, str]], videos: list[tuple[str, str, str]],
          decoded: bool | None) -> str:
    """``decoded``: True if every video shows decoded frames, False if none does, None if some do."""
    metrics = shown_metrics(summary)
    info = summary["metric_info"]
    models = _summary_models(summary)
    several = len(models) > 1
    esc = html.escape
    baseline = summary["baseline"]

    def first(label: str, data: dict[str, Any]) -> str:
        return (f'<td>{_spec_html(data["model"])}</td><td class="spec">{_spec_html(data["policy"])}</td>'
                if several else f"<td>{_spec_html(label)}</td>")

    def head(names: Sequence[str], count: str, info_of: Mapping[str, Any] | None) -> str:
        cells = ("<th>model</th>" if several else "") + f'<th class="spec">policy</th><th>{count}</th>'
        for name in names:
            meta = info_of.get(name) if info_of else None
            if meta is None:
                cells += f"<th>{esc(name)}</th>"
                continue
            better = {True: "↑ higher is better", False: "↓ lower is better"}.get(meta["higher_is_better"], "")
            cells += (f'<th title="{esc(meta["summary"])}">{esc(name)}'
                      + (f'<div class="meta">{esc(meta["unit"])}</div>' if meta["unit"] else "")
                      + (f'<div class="meta">{better}</div>' if better else "") + "</th>")
        return f"<thead><tr>{cells}</tr></thead>"

    rows = []
    for label, data in summary["policies"].items():
        cells = "".join('<td class="na">—</td>' if m in data["metrics_not_applicable"]
                        else f"<td>{_stat_html(format_stat(data['metrics'][m]))}</td>" for m in metrics)
        rows.append(f"<tr>{first(label, data)}<td>{data['jobs']}</td>{cells}</tr>")
    table = f'<table id="summary">{head(metrics, "jobs", info)}<tbody>{"".join(rows)}</tbody></table>'

    paired_html = ""
    paired = [(label, data) for label, data in summary["policies"].items() if data.get("paired")]
    if paired:
        prows = []
        for label, data in paired:
            cells = []
            for diff, word in _paired_cells(data, metrics, info):
                if diff is None:
                    cells.append('<td class="na">—</td>')
                    continue
                tip = (f"{diff['n']} pairs; 95% CI [{diff['ci_low']:.4g}, {diff['ci_high']:.4g}]"
                       if diff.get("ci_low") is not None else f"{diff['n']} pair(s): no interval")
                if diff.get("p") is not None:
                    tip += f"; paired t-test p = {diff['p']:.3g}"
                cells.append(f'<td class="{word or "unresolved"}" title="{esc(tip)}">'
                             f"{_stat_html(format_difference(diff))}{f'<div><b>{word}</b></div>' if word else ''}</td>")
            prows.append(f"<tr>{first(label, data)}<td>{_pairs(data)}</td>{''.join(cells)}</tr>")
        paired_html = (
            f"<h2>Difference from the baseline {_spec_html(baseline)}</h2>"
            f"<p>Per {'model, ' if several else ''}prompt and seed (the same noise): policy minus baseline, mean "
            f"± half-width of the 95% confidence interval over the pairs. "
            f'<span class="better">better</span>, <span class="worse">worse</span>, '
            f'<span class="differs">differs</span> (a metric without a better direction): resolved at 95% (the '
            f"interval excludes 0; paired t-test p &lt; 0.05). Grey: not resolved. Hover a cell for its interval "
            f"and p-value.</p>"
            f'<table id="paired">{head(metrics, "pairs", info)}<tbody>{"".join(prows)}</tbody></table>')

    fields = trace_field_names(summary)
    fields_html = ""
    if fields:
        frows = []
        for label, data in summary["policies"].items():
            if data.get("trace_fields"):
                cells = "".join(f"<td>{_stat_html(format_stat(data['trace_fields'][f]))}</td>" if f in data["trace_fields"]
                                else '<td class="na">—</td>' for f in fields)
                frows.append(f"<tr>{first(label, data)}<td>{data['jobs']}</td>{cells}</tr>")
        fields_html = ("<h2>Policies' own trace fields</h2><p>Numeric fields a policy returns from "
                       "<code>chunk_end</code> (bools count 1 when true, so a mean is a fraction of chunks): per job "
                       "the mean over chunks; cells: mean ± half-width of the 95% confidence interval over jobs.</p>"
                       f'<table id="trace-fields">{head(fields, "jobs", None)}<tbody>{"".join(frows)}</tbody></table>')

    legend_rows = "".join(
        f"<tr><td><code>{esc(m)}</code></td><td>{esc(info[m]['summary'])}</td><td>{esc(info[m]['unit'] or '—')}</td>"
        f"<td>{esc(_range_text(info[m]['range']))}</td><td>{esc(direction(info[m]['higher_is_better']))}</td></tr>"
        for m in metrics)
    legend = ('<h2>Metrics</h2><table id="metrics" class="legend"><thead><tr><th>metric</th><th>what it '
              "measures</th><th>unit</th><th>values</th><th>direction</th></tr></thead>"
              f"<tbody>{legend_rows}</tbody></table>")
    hidden = [m for m in summary["config"]["metrics"] if m not in metrics]
    if hidden:
        legend += (f"<p>Not shown, as they apply to none of the compared policies: "
                   f"{', '.join(f'<code>{esc(m)}</code>' for m in hidden)}.</p>")

    plot_html = "".join(f'<figure><img src="{esc(src)}" alt="{esc(title)}"></figure>' for title, src in plots)
    latent_note = "first three latent channels, normalised per video"
    note = ("decoded frames" if decoded else
            f"latent preview (the model has no decoder): {latent_note}" if decoded is False else
            f"decoded frames where the model has a decoder, else a latent preview: {latent_note}")
    failed_html = ""
    if summary.get("failed"):
        items = "".join(f"<li><code>{esc(f['model'])}</code> <code>{esc(f['policy'])}</code>, prompt "
                        f"{esc(repr(f['prompt']))}, seed {f['seed']}: {esc(f['error'])}</li>" for f in summary["failed"])
        failed_html = (f"<h2>Failed jobs</h2><p>{len(summary['failed'])} jobs failed; they are not in the tables, "
                       f"and a rerun of the command tries them again.</p><ul>{items}</ul>")
    video_html = "".join(f'<figure><img src="{esc(src)}" alt="{esc(title)}" title="left to right: {esc(order)}">'
                         f"<figcaption>{esc(title)}</figcaption></figure>" for title, src, order in videos)
    config = summary["config"]
    grid = (f"{len(models)} models x " if several else "") + f"{len(config['policies'])} policies x"
    order = "Models and policies" if several else "Policies"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cachepolicy compare: {esc(', '.join(models))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin-bottom: 0.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 6px; text-align: right; white-space: nowrap; }}
th {{ vertical-align: bottom; white-space: normal; }}
td:first-child, th:first-child, .spec {{ text-align: left; white-space: normal; }}
span.term {{ display: inline-block; }}
.pm {{ font-size: 0.9em; color: #555; }}
table.legend td, table.legend th {{ text-align: left; white-space: normal; }}
.meta {{ font-weight: normal; font-size: 0.85em; color: #555; }}
td.na {{ color: #aaa; text-align: center; }}
.better {{ background: #dcf2dc; }} .worse {{ background: #f8dcdc; }} .differs {{ background: #dde6f6; }}
td.unresolved {{ color: #888; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
figcaption {{ font-size: 0.8em; color: #555; max-width: 700px; }}
img {{ image-rendering: pixelated; max-width: 100%; }}
</style></head><body>
<h1>Policy comparison on {', '.join(f'<code>{esc(m)}</code>' for m in models)}</h1>
<p>{summary['jobs_done']} of {summary['jobs_total']} jobs: {grid}
{len(config['prompts'])} prompt(s) x {len(config['seeds'])} seed(s), {config['num_chunks']} chunks each.
Cells are mean ± half-width of the 95% confidence interval over jobs; — marks a metric that does not apply
to the policy. Hover a column's name for what it measures.
Data: <a href="summary.json">summary.json</a>, <a href="summary.md">summary.md</a>,
<a href="results.jsonl">results.jsonl</a>.</p>
{table}
{paired_html}
{fields_html}
{legend}
{failed_html}
<h2>Metrics against chunk index</h2>
<p>Mean over jobs with its 95% band (clipped to the values the metric can take).</p>
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
    plots = _plot_curves(folder, config, records, summary) if records else []
    videos = _side_by_side(folder, config, records) if records else []
    flags = {bool(r.get("preview_decoded")) for r in records}
    decoded = flags == {True} if len(flags) < 2 else None
    atomic_write_bytes(folder / "report.html", _html(summary, plots, videos, decoded).encode())
    logger.info("report written to %s", folder / "report.html")
    return summary
