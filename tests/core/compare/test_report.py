"""The report's statistics (checked against hand-computed cases and scipy's t quantiles), the paired table
against a baseline, the columns that apply, the policies' trace fields, and what a reader sees."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats as scipy_stats

from cachepolicy.api import build_policies
from cachepolicy.compare import CompareConfig
from cachepolicy.metrics import policy_trace_fields
from cachepolicy.report import (curve_band, format_difference, line_style, shown_metrics, summarise,
                                summary_markdown, write_report)
from cachepolicy.stats import mean_ci, paired_difference, t_quantile


# ----------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (120, 1.980)])
def test_t_quantile_is_scipys_and_the_printed_table(df, table):
    assert t_quantile(df) == scipy_stats.t.ppf(0.975, df)
    assert t_quantile(df) == pytest.approx(table, abs=5e-4)
    assert math.isnan(t_quantile(0))


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [0.5, 0.25, 0.75, 1.5, 2.0, -1.0, 3.0]])
def test_mean_ci_half_width_is_t_times_sd_over_sqrt_n(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)  # scipy's quantile is the oracle
    got = mean_ci(values + [None, math.nan])  # missing values are left out
    assert got["n"] == n and got["mean"] == pytest.approx(mean)
    assert got["ci_high"] - got["mean"] == pytest.approx(half, rel=1e-12)
    assert got["mean"] - got["ci_low"] == pytest.approx(half, rel=1e-12)


def test_paired_difference_of_a_hand_made_sample():
    """Differences 0.5, 1.5, 1.0, 0.0, 2.0: mean 1.0, sd sqrt(2.5 / 4); t = 1.0 / (sd / sqrt(5)) = 2.828 on
    4 degrees of freedom, just resolved (p = 0.047)."""
    baseline = [1.0, 2.0, 30.0, 4.0, -5.0]  # a large spread between seeds, which pairing removes
    values = [b + d for b, d in zip(baseline, [0.5, 1.5, 1.0, 0.0, 2.0])]
    sd = math.sqrt(2.5 / 4)
    half = scipy_stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    got = paired_difference(values, baseline)
    assert got["n"] == 5 and got["mean"] == pytest.approx(1.0) and got["sd"] == pytest.approx(sd)
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))
    assert got["t"] == pytest.approx(1.0 / (sd / math.sqrt(5)))
    assert got["p"] == pytest.approx(2 * scipy_stats.t.sf(got["t"], 4)) and 0.04 < got["p"] < 0.05
    assert got["resolved"] is True
    # the same values unpaired: the spread between seeds hides the difference
    assert mean_ci(values)["ci_low"] < mean_ci(baseline)["ci_high"]

    swapped = paired_difference(baseline, values)
    assert swapped["mean"] == pytest.approx(-1.0) and swapped["resolved"] is True


def test_paired_difference_unresolved_single_constant_and_missing():
    unresolved = paired_difference([1.0, -1.0, 2.0, -2.0, 0.5], [0.0] * 5)
    assert unresolved["mean"] == pytest.approx(0.1) and unresolved["resolved"] is False
    assert unresolved["p"] > 0.05 and unresolved["ci_low"] < 0 < unresolved["ci_high"]
    one = paired_difference([3.0], [1.0])
    assert (one["mean"], one["n"], one["ci_low"], one["p"], one["resolved"]) == (2.0, 1, None, None, False)
    constant = paired_difference([5.0, 6.0, 7.0], [4.0, 5.0, 6.0])  # known exactly: resolved
    assert (constant["ci_low"], constant["ci_high"], constant["p"], constant["resolved"]) == (1.0, 1.0, 0.0, True)
    same = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert (same["mean"], same["p"], same["resolved"]) == (0.0, None, False)
    missing = paired_difference([1.0, None, math.nan, 4.0, 2.0], [0.0, 1.0, 1.0, None, 1.0])
    assert missing["n"] == 2 and missing["mean"] == pytest.approx(1.0)
    assert paired_difference([], [])["mean"] is None
    with pytest.raises(ValueError, match="differ in length: 2 values, 1 baseline"):
        paired_difference([1.0, 2.0], [1.0])
    assert format_difference(one) == "+2 (1 pair)" and format_difference(None) == "n/a"


# ----------------------------------------------------------------------------------------- summary
POLICIES = ["full", "sliding-window:frames=3", "attention-sink:frames=1+sliding-window:frames=3"]


def _config(**overrides):
    fields = dict(model="tiny-wan", policies=POLICIES, prompts=["a", "b"], seeds=[0, 1, 2], num_chunks=2,
                  metrics=["cache-mb", "cache-tokens", "tokentrim-triggers"])
    fields.update(overrides)
    return CompareConfig(**fields)


def _records(config, value):
    """One finished line per job, with ``value(policy, prompt, seed) -> cache-mb``."""
    records = []
    for job in config.jobs():
        mb = value(job.policy, job.prompt, job.seed)
        records.append({"job_id": job.id, "model": job.model, "policy": job.policy, "policy_resolved": job.policy,
                        "prompt": job.prompt, "seed": job.seed, "status": "done",
                        "metrics": {"cache-mb": mb, "cache-tokens": 10.0, "tokentrim-triggers": 0.0},
                        "curves": {"cache-mb": [mb, mb]}})
    return records


def _mb(policy, prompt, seed):
    """Jobs differ a lot between seeds; a window saves exactly 1 MiB (+ a little per seed), the sink nothing."""
    base = 10.0 * seed + (5.0 if prompt == "b" else 0.0)
    return base - {"full": 0.0, "sliding-window:frames=3": 1.0 + 0.1 * seed}.get(policy, 0.1 * (seed - 1))


def test_summary_pairs_each_policy_with_the_baseline():
    config = _config()
    summary = summarise(config, _records(config, _mb))
    assert summary["baseline"] == "full" and summary["policies"]["full"]["paired"] is None
    window = summary["policies"]["sliding-window:frames=3"]["paired"]["cache-mb"]
    diffs = [-(1.0 + 0.1 * seed) for _ in "ab" for seed in (0, 1, 2)]
    assert window["n"] == 6 and window["mean"] == pytest.approx(sum(diffs) / 6)
    assert window["resolved"] is True
    sink = summary["policies"]["attention-sink:frames=1+sliding-window:frames=3"]["paired"]["cache-mb"]
    assert sink["mean"] == pytest.approx(0.0, abs=1e-12) and sink["resolved"] is False
    # unpaired, the window's interval overlaps full's: the spread between seeds hides the saving
    means = summary["policies"]
    assert means["sliding-window:frames=3"]["metrics"]["cache-mb"]["ci_high"] > means["full"]["metrics"]["cache-mb"]["ci_low"]
    assert summary["metric_info"]["cache-mb"] == {"summary": "K/V buffer size after each chunk; scalar = peak",
                                                  "unit": "MiB", "higher_is_better": False, "range": [0.0, None],
                                                  "for_policies": []}

    markdown = summary_markdown(json.loads(json.dumps(summary)))
    paired = markdown.split("## Paired difference from `full`")[1].split("##")[0]
    rows = [line for line in paired.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `sliding-window:frames=3` | 6 | **-1.1 ± 0.") and "** better |" in rows[0]
    assert "better" not in rows[1] and "**" not in rows[1]
    assert "cache-mb ↓ (MiB)" in markdown and "cache-tokens (tokens)" in markdown
    assert "`cache-mb`: K/V buffer size after each chunk; scalar = peak; lower is better; unit: MiB" in markdown


def test_another_baseline_pairs_the_others_with_it():
    config = _config(baseline="sliding-window:frames=3")
    summary = summarise(config, _records(config, _mb))
    assert summary["baseline"] == "sliding-window:frames=3"
    assert summary["policies"]["sliding-window:frames=3"]["paired"] is None
    full = summary["policies"]["full"]["paired"]["cache-mb"]
    assert full["mean"] == pytest.approx(1.1) and full["resolved"] is True
    assert "** worse |" in summary_markdown(summary)  # full holds more memory than the window
    # one that resolves to a listed policy names it
    other = _config(baseline="sliding-window:frames=3+attention-sink:frames=1")
    assert summarise(other, _records(other, _mb))["baseline"] == POLICIES[2]
    assert other.fingerprint == _config().fingerprint  # the baseline changes no result


def test_only_the_columns_that_apply_are_shown():
    config = _config()
    summary = summarise(config, _records(config, _mb))
    assert all(data["metrics_not_applicable"] == ["tokentrim-triggers"] for data in summary["policies"].values())
    assert shown_metrics(summary) == ["cache-mb", "cache-tokens"]
    assert "tokentrim-triggers" not in summary_markdown(summary).split("## Metrics")[0]

    with_trim = _config(policies=["full", "tokentrim:p=0.1"])
    summary = summarise(with_trim, _records(with_trim, lambda *_: 1.0))
    assert shown_metrics(summary) == ["cache-mb", "cache-tokens", "tokentrim-triggers"]
    table = [line for line in summary_markdown(summary).splitlines() if line.startswith("| `")]
    assert table[0].endswith("| — |") and table[1].endswith("| 0 ± 0 |")  # full: does not apply
    assert summary["policies"]["tokentrim:p=0.1"]["paired"]["tokentrim-triggers"] is None  # full has none


def test_policy_trace_fields_are_summarised_like_metrics():
    trace = [{"cache_tokens": 4, "severity": [None], "triggered": [False], "attempts": [[]], "note": "x"},
             {"cache_tokens": 8, "severity": [1.0], "triggered": [True], "attempts": [[1.0]], "note": "y"},
             {"cache_tokens": 8, "severity": [3.0], "triggered": [False], "attempts": [[3.0, 2.0]], "note": "z"}]
    sources = {"severity": "tokentrim", "triggered": "tokentrim", "attempts": "tokentrim", "note": "tokentrim"}
    fields = policy_trace_fields(trace, sources)
    assert fields == {"tokentrim.severity": {"value": 2.0, "per_chunk": [None, 1.0, 3.0], "range": [None, None]},
                      "tokentrim.triggered": {"value": pytest.approx(1 / 3), "per_chunk": [0.0, 1.0, 0.0],
                                              "range": [0.0, 1.0]}}
    assert policy_trace_fields(trace, {"cache_tokens": "x"}) == {
        "x.cache_tokens": {"value": 20 / 3, "per_chunk": [4.0, 8.0, 8.0], "range": [None, None]}}
    trim = build_policies("tokentrim")[0]  # its declared ranges
    assert policy_trace_fields(trace, {"severity": trim})["tokentrim.severity"]["range"] == [0.0, None]

    config = _config(policies=["full", "tokentrim:p=0.1"])
    records = _records(config, lambda *_: 1.0)
    for index, record in enumerate(r for r in records if r["policy"] != "full"):
        record["trace_fields"] = {"tokentrim.severity": {"value": float(index), "per_chunk": [None, float(index)],
                                                         "range": [0.0, None]}}
    summary = summarise(config, records)
    assert summary["policies"]["full"]["trace_fields"] == {}
    assert summary["policies"]["tokentrim:p=0.1"]["trace_fields"]["tokentrim.severity"] == mean_ci(range(6))
    markdown = summary_markdown(summary)
    assert "| `tokentrim:p=0.1` | 6 | 2.5 ± 2 |" in markdown.split("## Policies' own trace fields")[1]


def test_bands_are_clipped_to_the_metric_range_and_lines_differ():
    curves = [[0.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]
    mean, low, high = curve_band(curves)
    half = scipy_stats.t.ppf(0.975, 2) * math.sqrt(4 / 3) / math.sqrt(3)
    assert mean[1] == pytest.approx(2 / 3) and low[1] == pytest.approx(2 / 3 - half) and low[1] < 0
    assert (low[0], high[0], low[2], high[2]) == (0.0, 0.0, 1.0, 1.0)
    _, low, high = curve_band(curves, (0.0, 1.5))
    assert low[1] == 0.0 and high[1] == 1.5
    _, low, _ = curve_band([[1.0, None], [2.0, 5.0]])
    assert math.isnan(low[1])  # one value: no band

    config = _config(policies=[f"sliding-window:frames={n}" for n in range(3, 9)])
    styles = [line_style(config, "tiny-wan", p) for p in config.policies]
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in styles}) == 6
    assert len({s["linestyle"] for s in styles}) > 1 and len({s["marker"] for s in styles}) == 6


def test_the_html_says_what_is_resolved_and_labels_videos_in_full(tmp_path):
    import numpy as np
    from PIL import Image, ImageDraw

    from cachepolicy.report import _wrap_label

    config = _config()
    records = _records(config, _mb)
    for record in records:
        (tmp_path / "jobs" / record["job_id"]).mkdir(parents=True)
        np.save(tmp_path / "jobs" / record["job_id"] / "preview.npy", np.zeros((2, 64, 64, 3), dtype=np.uint8))
    write_report(tmp_path, config, records)
    page = (tmp_path / "report.html").read_text()
    assert '<td class="better" title="6 pairs; 95% CI [' in page and "paired t-test p = " in page
    assert page.count('class="unresolved"') == 3  # the sink's cache-mb; cache-tokens (equal in every job)
    assert ('<code><span class="term">attention-sink:<wbr>frames=1</span><span class="term">+sliding-window:<wbr>'
            'frames=3</span></code>') in page  # a term per block; inside one, breaks only after ':' and ','
    assert "span.term { display: inline-block; }" in page
    assert 'title="left to right: full | sliding-window:frames=3 | attention-sink:frames=1+sliding-window' in page
    assert "tokentrim-triggers" in page.split('id="metrics"')[1]  # named as not shown, and why
    assert "tokentrim-triggers" not in page.split('id="metrics"')[0]
    assert (tmp_path / "plots" / "cache-mb.png").is_file() and not (tmp_path / "plots" / "tokentrim-triggers.png").exists()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap_label("attention-sink:frames=3+sliding-window:frames=6+tokentrim:p=0.1", 60, draw)
    assert "".join(lines) == "attention-sink:frames=3+sliding-window:frames=6+tokentrim:p=0.1"
    assert all(draw.textlength(line) <= 60 for line in lines)  # nothing cut off
    assert [line[:4] for line in lines if line.startswith("+")] == ["+sli", "+tok"]  # a term per line
