"""``cachepolicy compare``: resumable results, the report, reproducibility, and errors before any job."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cachepolicy.cli import main
from cachepolicy.compare import CompareConfig, ResultsStore, parse_seeds, read_prompts, run_compare
from cachepolicy.errors import CompareConfigError, UnknownNameError
from cachepolicy.report import format_stat

POLICIES = "full; sliding-window:frames=3; attention-sink:frames=3+sliding-window:frames=3"
METRICS = ("latent-drift", "flicker", "frame-stats-drift", "cache-tokens", "seconds-per-chunk")


def config(**overrides):
    base = dict(model="tiny-wan", policies=[p.strip() for p in POLICIES.split(";")], prompts=["a red square"],
                seeds=[0, 1], num_chunks=3, metrics=METRICS)
    base.update(overrides)
    return CompareConfig(**base)


class _Refs(HTMLParser):
    """The references of a page, and the body rows of each table by its id (``rows``: the summary's)."""

    def __init__(self):
        super().__init__()
        self.refs, self.table_rows = [], {}
        self._in_body = False
        self._table = None

    @property
    def rows(self):
        return self.table_rows.get("summary", 0)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.refs.append(attrs[key])
        if tag == "table":
            self._table = attrs.get("id")
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self.table_rows[self._table] = self.table_rows.get(self._table, 0) + 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False


def test_report_files_table_and_numbers(tmp_path):
    out = tmp_path / "cmp"
    summary = run_compare(config(), out)
    parser = _Refs()
    parser.feed((out / "report.html").read_text())
    assert parser.refs, "the report refers to its plots and videos"
    for ref in parser.refs:
        assert not re.match(r"^[a-z]+://", ref), f"{ref} is not offline"
        assert (out / ref).is_file(), f"report.html refers to missing {ref}"
    assert any(r.startswith("plots/") for r in parser.refs) and any(r.startswith("videos/") for r in parser.refs)
    assert parser.rows == 3  # one row per policy
    assert parser.table_rows["paired"] == 2  # one per policy but the baseline
    markdown = (out / "summary.md").read_text()
    table = [line for line in markdown.split("## Paired")[0].splitlines() if line.startswith("| `")]
    assert len(table) == 3
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for line, (policy, data) in zip(table, on_disk["policies"].items()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"`{policy}`" and int(cells[1]) == data["jobs"] == 2
        assert cells[2:] == [format_stat(data["metrics"][m]) for m in METRICS]
    # hand check of one cell: cache tokens of the window are 3 frames x 16 tokens in every job
    assert on_disk["policies"]["sliding-window:frames=3"]["metrics"]["cache-tokens"]["mean"] == 48


def test_same_command_twice_gives_the_same_metrics(tmp_path):
    first = [json.loads(l) for l in _run_cli(tmp_path / "a").read_text().splitlines()]
    second = [json.loads(l) for l in _run_cli(tmp_path / "b").read_text().splitlines()]
    key = lambda r: r["job_id"]  # noqa: E731
    for a, b in zip(sorted(first, key=key), sorted(second, key=key)):
        for metric in ("latent-drift", "flicker", "frame-stats-drift", "cache-tokens"):
            assert a["metrics"][metric] == b["metrics"][metric]
            assert a["curves"][metric] == b["curves"][metric]


def _run_cli(out: Path) -> Path:
    code = main(["compare", "tiny-wan", "--policies", POLICIES, "--prompts", "a red square", "--seeds", "0-1",
                 "--chunks", "3", "--metrics", ",".join(METRICS), "--out", str(out), "--no-progress"])
    assert code == 0
    return out / "results.jsonl"


def test_rerun_skips_finished_jobs_and_other_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    results = _run_cli(out)
    before = results.read_bytes()
    mtime = (out / "jobs").stat().st_mtime_ns
    _run_cli(out)  # same configuration: nothing to do
    assert results.read_bytes() == before
    assert (out / "jobs").stat().st_mtime_ns == mtime
    code = main(["compare", "tiny-wan", "--policies", "full", "--prompts", "a red square", "--seeds", "0-1",
                 "--chunks", "3", "--out", str(out), "--no-progress"])
    assert code == 2
    assert "holds results of another configuration (differs in: metrics, policies)" in capsys.readouterr().err
    assert results.read_bytes() == before
    code = main(["compare", "tiny-wan", "--policies", "full", "--prompts", "a red square", "--seeds", "0",
                 "--chunks", "2", "--metrics", "cache-tokens", "--out", str(out), "--no-progress", "--force"])
    assert code == 0
    archived = list(out.glob("archive-*/results.jsonl"))
    assert len(archived) == 1 and archived[0].read_bytes() == before
    assert len(results.read_text().splitlines()) == 1


def _line(job_id: str) -> dict:
    return {"job_id": job_id, "policy": "full", "prompt": "a red square", "seed": 0, "metrics": {}, "curves": {}}


def test_a_torn_last_line_is_ignored_and_cut_before_appending(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(_line("a"))
    with open(store.path, "ab") as handle:
        handle.write(b'{"job_id": "b", "x"')  # a crash in the middle of a write
    assert [r["job_id"] for r in store.load()] == ["a"]
    store.repair()
    store.append(_line("c"))
    assert [r["job_id"] for r in store.load()] == ["a", "c"]
    assert store.path.read_text().count("\n") == 2


@pytest.mark.parametrize("args, message", [
    (["--prompts", "missing-prompts.txt"], "prompts file missing-prompts.txt does not exist"),
    (["--prompts", "EMPTY"], "holds no prompt"),
    (["--seeds", "0-x"], "cannot parse seeds '0-x' at '0-x'"),
    (["--seeds", "5-2"], "runs backwards"),
    (["--metrics", "latent-drfit"], "unknown metric 'latent-drfit'. Did you mean 'latent-drift'"),
    (["--metrics", "feature-consistency"], "metric 'feature-consistency' was asked for but is unavailable: needs local weights"),
    (["--policies", "full; sliding-window:frames=3; sliding-windw:frames=3; full; full"],
     "policy spec 3 of 5 ('sliding-windw:frames=3'): unknown policy 'sliding-windw'"),
    (["--policies", "full; sliding-window:frames=2"],
     "policy spec 2 of 2 ('sliding-window:frames=2'): sliding-window: frames=2 is shorter than one chunk"),
    (["--chunks", "400"], "passes the model's rope_max_seq_len=1024"),
    (["--policies", "full; sliding-window:frames=3", "--baseline", "sliding-window:frames=4"],
     "--baseline 'sliding-window:frames=4' is none of the compared policies; it must be one of: 'full'; "
     "'sliding-window:frames=3'"),
])
def test_bad_input_is_refused_before_any_job(tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    base = {"--policies": "full", "--prompts": "a red square", "--seeds": "0", "--chunks": "2"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    out = tmp_path / "cmp"
    argv = ["compare", "tiny-wan", "--out", str(out), "--no-progress"]
    for flag, value in base.items():
        argv += [flag, value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()


def test_parsers():
    assert parse_seeds("0-3,8,2") == (0, 1, 2, 3, 8)
    assert read_prompts("a; b ;a") == ("a", "b")
    with pytest.raises(UnknownNameError):
        run_compare(config(metrics=("nope",)), "/nonexistent/never-written")
    with pytest.raises(CompareConfigError, match="--chunks must be at least 1"):
        run_compare(config(num_chunks=0), "/nonexistent/never-written")


# ------------------------------------------------------------------------------------- several models
TWO_POLICIES = ["full", "attention-sink:frames=1+sliding-window:frames=3"]
REPRODUCIBLE = ("latent-drift", "flicker", "frame-stats-drift", "cache-tokens")


def _two_model_config(models=("tiny-wan", "tiny-skyreels")):
    return CompareConfig(models=models, policies=TWO_POLICIES, prompts=["a red fox"], seeds=[0, 1], num_chunks=2,
                         metrics=REPRODUCIBLE)


def test_two_models_in_one_compare(tmp_path):
    out = tmp_path / "two"
    summary = run_compare(_two_model_config(), out)
    results = out / "results.jsonl"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 8
    assert {(r["model"], r["policy"], r["seed"]) for r in lines} == {
        (m, p, s) for m in ("tiny-wan", "tiny-skyreels") for p in TWO_POLICIES for s in (0, 1)}
    assert [r["model"] for r in lines] == ["tiny-wan"] * 4 + ["tiny-skyreels"] * 4  # one model at a time
    assert list(summary["policies"]) == [f"{m}: {p}" for m in ("tiny-wan", "tiny-skyreels") for p in TWO_POLICIES]
    for data in summary["policies"].values():
        assert data["jobs"] == 2
        for metric in REPRODUCIBLE:
            assert math.isfinite(data["metrics"][metric]["mean"]), (data["model"], data["policy"], metric)
    assert json.loads((out / "config.json").read_text())["config"]["models"] == ["tiny-wan", "tiny-skyreels"]

    # summary.md has a model column; report.html one row per (model, policy) and only local references
    markdown = (out / "summary.md").read_text()
    assert "# Policy comparison: tiny-wan, tiny-skyreels" in markdown
    assert "| model | policy | jobs |" in markdown
    assert f"| `tiny-skyreels` | `{TWO_POLICIES[1]}` | 2 |" in markdown
    parser = _Refs()
    parser.feed((out / "report.html").read_text())
    assert parser.rows == 4
    assert all((out / ref).is_file() for ref in parser.refs)

    # resume: the same configuration again runs nothing and appends nothing
    before = results.read_bytes()
    mtime = (out / "jobs").stat().st_mtime_ns
    run_compare(_two_model_config(), out)
    assert results.read_bytes() == before and (out / "jobs").stat().st_mtime_ns == mtime
    # a killed run (the last three lines lost, one of them torn) finishes each job exactly once
    kept = before.splitlines(keepends=True)[:5]
    results.write_bytes(b"".join(kept) + before.splitlines(keepends=True)[5][:20])
    run_compare(_two_model_config(), out)
    records = ResultsStore(results).load()
    assert len(records) == len(results.read_text().splitlines()) == 8
    assert len({r["job_id"] for r in records}) == 8

    # the tiny-wan rows are those of a compare of tiny-wan alone, to the last digit
    alone = run_compare(_two_model_config(models=("tiny-wan",)), tmp_path / "alone")
    for policy in TWO_POLICIES:
        assert alone["policies"][policy]["metrics"] == summary["policies"][f"tiny-wan: {policy}"]["metrics"]
    single = {r["job_id"]: r for r in ResultsStore(tmp_path / "alone" / "results.jsonl").load()}
    assert len(single) == 4
    for record in (r for r in lines if r["model"] == "tiny-wan"):
        assert single[record["job_id"]]["metrics"] == record["metrics"]
        assert single[record["job_id"]]["curves"] == record["curves"]
    assert "| model |" not in (tmp_path / "alone" / "summary.md").read_text()  # one model: today's table


def test_cli_takes_several_models_and_checks_each_before_any_job(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "tiny-wan", "tiny-skyreels", "--policies", "full", "--prompts", "a red fox", "--chunks", "1",
            "--metrics", "cache-tokens", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    records = ResultsStore(out / "results.jsonl").load()
    assert [r["model"] for r in records] == ["tiny-wan", "tiny-skyreels"]
    assert "| `tiny-skyreels` | `full` | 1 |" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main(["compare", "tiny-wan", "tiny-skyrels", *argv[3:-3], "--out", str(bad), "--no-progress"]) == 2
    assert "unknown model 'tiny-skyrels'. Did you mean 'tiny-skyreels'" in capsys.readouterr().err
    assert not (bad / "results.jsonl").exists()
    with pytest.raises(UnknownNameError):
        run_compare(_two_model_config(models=("tiny-wan", "nope")), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_model_is_a_shorthand_and_old_config_folders_still_report(tmp_path, capsys):
    assert config() == config(model=None, models=("tiny-wan",)) == CompareConfig.from_json(config().to_json())
    assert config().models == ("tiny-wan",) and config(model=None, models="tiny-wan").models == ("tiny-wan",)
    with pytest.raises(TypeError, match="exactly one"):
        config(models=("tiny-wan",))
    # a folder written before several models: config.json has "model", results lines no "model"
    out = tmp_path / "old"
    run_compare(config(policies=["full", "sliding-window:frames=3"], num_chunks=2, metrics=REPRODUCIBLE), out)
    summary = json.loads((out / "summary.json").read_text())
    markdown = (out / "summary.md").read_text()
    saved = json.loads((out / "config.json").read_text())
    saved["config"] = {"model": "tiny-wan", **{k: v for k, v in saved["config"].items() if k != "models"}}
    (out / "config.json").write_text(json.dumps(saved))
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "model"}) + "\n"
                                               for r in lines))
    for name in ("summary.json", "summary.md", "report.html"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["policies"] == summary["policies"]
    assert (out / "summary.md").read_text() == markdown
    assert "report.html" in capsys.readouterr().out


def test_a_damaged_preview_is_left_out_of_the_videos_and_named(tmp_path, caplog):
    out = tmp_path / "cmp"
    run_compare(config(policies=["full", "sliding-window:frames=3"], seeds=[0], num_chunks=2,
                       metrics=("cache-tokens",)), out)
    (preview,) = [p for p in out.glob("jobs/*/preview.npy")][:1]
    preview.write_bytes(preview.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        assert main(["report", str(out)]) == 0
    assert f"{preview} is damaged" in caplog.text and "left out of the side-by-side videos" in caplog.text
    assert (out / "videos" / "prompt0-seed0.gif").is_file()  # the other policy's panel is still there


def test_default_metrics_are_those_of_every_model():
    from cachepolicy.compare import default_metrics

    assert "scene-count-error" in default_metrics(models=["drift-lab"])
    assert not any(m.startswith("scene-") for m in default_metrics(models=["drift-lab", "tiny-wan"]))
    assert default_metrics(model="tiny-wan") == default_metrics(None, ["tiny-wan", "tiny-skyreels"])


def test_compare_under_a_recipe_composes_its_policies_and_records_it(tmp_path):
    """``recipe="longlive"``: each job runs LongLive's sink + window with the job's policy on top, exactly as
    a rollout with that recipe does."""
    import attrs
    import torch
    from safetensors.torch import load_file

    from cachepolicy.api import build_policies, load_model, rollout

    config = CompareConfig(model="tiny-wan", policies=["full", "tokentrim:summary_at=final"], prompts=["a red fox"],
                           seeds=[3], num_chunks=5, metrics=["latent-drift", "cache-tokens"], recipe="longlive")
    summary = run_compare(config, tmp_path / "cmp")
    results = [json.loads(line) for line in (tmp_path / "cmp" / "results.jsonl").read_text().splitlines()]
    resolved = {r["policy"]: r["policy_resolved"] for r in results}
    assert resolved["full"].startswith("attention-sink:frames=3+sliding-window:frames=6+full")
    assert resolved["tokentrim:summary_at=final"].startswith("attention-sink:frames=3+sliding-window:frames=6+tokentrim")
    assert summary["config"]["recipe"] == "longlive"
    assert "recipe `longlive`" in (tmp_path / "cmp" / "summary.md").read_text()
    # cache bounded by LongLive's window: 3 sink + 6 context + 3 own frames at 16 tokens per frame
    assert max(r["curves"]["cache-tokens"][-1] for r in results) <= 9 * 16
    direct = rollout(load_model("tiny-wan"), build_policies("full"), num_chunks=5, prompts=["a red fox"], seeds=[3],
                     recipe="longlive")
    job = next(r for r in results if r["policy"] == "full")
    saved = load_file(str(tmp_path / "cmp" / "jobs" / job["job_id"] / "latents.safetensors"))
    assert torch.equal(next(iter(saved.values())), direct.latents)
    with pytest.raises(CompareConfigError, match="unknown recipe 'longliv'"):
        run_compare(attrs.evolve(config, recipe="longliv"), tmp_path / "bad")


def _lab_weights_copy(folder: Path) -> Path:
    from cachepolicy.adapters.wan.drift_lab import packaged_weights

    folder.mkdir()
    for name in ("config.json", "weights.safetensors"):
        (folder / name).write_bytes((packaged_weights() / name).read_bytes())
    return folder


def _retrain_in_place(folder: Path) -> None:
    """Change one tensor of a lab weights folder by 1e-4 (what a retraining into the same path does)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "weights.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-4
    save_file(tensors, folder / "weights.safetensors")


def test_results_of_other_weights_are_refused(tmp_path, capsys):
    """Same configuration, weights replaced in place (a retrained model): refused, then archived by --force."""
    from cachepolicy.api import load_model

    weights = _lab_weights_copy(tmp_path / "weights")
    out = tmp_path / "cmp"
    args = ["compare", "drift-lab", "--model-option", f"path={weights}", "--policies", "full",
            "--prompts", "a red triangle bouncing slowly over a gray-to-purple gradient", "--seeds", "0",
            "--chunks", "1", "--metrics", "cache-tokens", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = out / "results.jsonl"
    before = results.read_bytes()
    old_id = json.loads(before)["weights"]
    assert old_id == load_model("drift-lab", path=str(weights)).weights_id()
    assert main(args) == 0 and results.read_bytes() == before  # same weights: resumed, nothing to do

    _retrain_in_place(weights)
    new_id = load_model("drift-lab", path=str(weights)).weights_id()
    assert new_id != old_id
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds results of other weights" in err and f"drift-lab ({old_id} -> {new_id})" in err
    assert results.read_bytes() == before
    assert main(args + ["--force"]) == 0
    assert [a.read_bytes() for a in out.glob("archive-*/results.jsonl")] == [before]
    assert json.loads(results.read_bytes())["weights"] == new_id


class _UncheckedExecutor:
    """Runs jobs in this process like a remote executor would: the driver loads no model beforehand."""

    name = "unchecked"

    def map_unordered(self, worker, payloads):
        for payload in payloads:
            yield worker(payload)


def test_mixed_weights_without_a_check_before_the_jobs_are_reported(tmp_path, caplog):
    weights = _lab_weights_copy(tmp_path / "weights")
    config = CompareConfig(model="drift-lab", policies=["full"], seeds=[0, 1], num_chunks=1,
                           prompts=["a red triangle bouncing slowly over a gray-to-purple gradient"],
                           metrics=["cache-tokens"], model_options={"path": str(weights)})
    out = tmp_path / "cmp"
    run_compare(config, out, executor=_UncheckedExecutor())
    results = out / "results.jsonl"
    first_line = results.read_text().splitlines()[0]
    results.write_text(first_line + "\n")  # a run killed after its first job
    _retrain_in_place(weights)
    with caplog.at_level("WARNING", logger="cachepolicy.compare"):
        run_compare(config, out, executor=_UncheckedExecutor())
    ids = {json.loads(line)["weights"] for line in results.read_text().splitlines()}
    assert len(ids) == 2
    assert f"come from 2 different weights (ids {', '.join(sorted(ids))})" in caplog.text


def test_drift_lab_results_of_another_recipe_are_refused(tmp_path, capsys):
    """The lab's weights id covers the sampler of its config.json: the same tensors sampled with another
    recipe (the shipped one changed in place from Euler to guided fresh noise) are not resumed."""
    from cachepolicy.api import load_model
    from cachepolicy.models import module_weights_id

    weights = _lab_weights_copy(tmp_path / "weights")
    adapter = load_model("drift-lab", path=str(weights))
    assert adapter.weights_id() != module_weights_id(adapter.model)
    assert adapter.weights_id() == load_model("drift-lab", path=str(weights)).weights_id()
    out = tmp_path / "cmp"
    args = ["compare", "drift-lab", "--model-option", f"path={weights}", "--policies", "full",
            "--prompts", "a red triangle bouncing slowly over a gray-to-purple gradient", "--seeds", "0",
            "--chunks", "1", "--metrics", "cache-tokens", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    config = json.loads((weights / "config.json").read_text())
    config.update(sampler_steps=12, sampler_noise="predicted", sampler_guidance=1.0)  # the old recipe
    (weights / "config.json").write_text(json.dumps(config))
    assert main(args) == 2
    assert "holds results of other weights" in capsys.readouterr().err


# ------------------------------------------------------------------------------ baseline and trace fields
def test_baseline_pairs_and_policies_trace_fields_reach_the_report(tmp_path, capsys):
    """TokenTrim's numeric trace fields are summarised in its row only; another --baseline resumes the same
    folder (it changes no result) and pairs the others with it; ``report --baseline`` leaves config.json."""
    out = tmp_path / "cmp"
    argv = ["compare", "tiny-wan", "--policies", "full; tokentrim:p=0.2,warmup=1", "--prompts", "a red fox",
            "--seeds", "0-1", "--chunks", "4", "--metrics", "cache-tokens,latent-drift,tokentrim-triggers",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    records = {r["policy"]: r for r in ResultsStore(out / "results.jsonl").load()}
    assert records["full"]["trace_fields"] == {}
    fields = records["tokentrim:p=0.2,warmup=1"]["trace_fields"]
    assert sorted(fields) == ["tokentrim.severity", "tokentrim.threshold", "tokentrim.tokentrim_retries",
                              "tokentrim.triggered"]  # severity_attempts and pruned_positions are not numbers
    trace = [json.loads(line) for line in (out / "jobs" / records["tokentrim:p=0.2,warmup=1"]["job_id"]
                                           / "trace.jsonl").read_text().splitlines()]
    assert fields["tokentrim.severity"]["per_chunk"] == [r["severity"][0] for r in trace]
    assert fields["tokentrim.severity"]["range"] == [0.0, None] and fields["tokentrim.triggered"]["range"] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "full" and summary["policies"]["full"]["trace_fields"] == {}
    assert summary["policies"]["tokentrim:p=0.2,warmup=1"]["trace_fields"]["tokentrim.severity"]["n"] == 2
    page = (out / "report.html").read_text()
    assert "Policies' own trace fields" in page and (out / "plots" / "trace-tokentrim.severity.png").is_file()
    assert "Difference from the baseline <code><span class=\"term\">full</span></code>" in page

    config_before = (out / "config.json").read_text()
    assert main(["report", str(out), "--baseline", "tokentrim:warmup=1,p=0.2"]) == 0  # same policy, other order
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "tokentrim:p=0.2,warmup=1" and summary["policies"]["full"]["paired"] is not None
    assert (out / "config.json").read_text() == config_before
    assert main(["report", str(out), "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is none of the compared policies" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["baseline"] == "tokentrim:p=0.2,warmup=1"  # unwritten

    before = (out / "results.jsonl").read_bytes()
    assert main(argv + ["--baseline", "tokentrim:p=0.2,warmup=1"]) == 0  # resumed: nothing runs again
    assert (out / "results.jsonl").read_bytes() == before
    assert json.loads((out / "config.json").read_text())["config"]["baseline"] == "tokentrim:p=0.2,warmup=1"
    assert "## Paired difference from `tokentrim:p=0.2,warmup=1`" in capsys.readouterr().out


def test_a_folder_from_before_paired_statistics_still_reports(tmp_path):
    """Lines without trace fields or resolved policies, a config.json without a baseline."""
    out = tmp_path / "old"
    run_compare(config(policies=["full", "sliding-window:frames=3"], num_chunks=2,
                       metrics=("cache-tokens", "tokentrim-triggers")), out)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k not in ("trace_fields", "policy_resolved")}) + "\n"
        for r in lines))
    for name in ("summary.json", "summary.md", "report.html"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "full"
    means = {p: summary["policies"][p]["metrics"]["cache-tokens"]["mean"] for p in ("full", "sliding-window:frames=3")}
    assert means["full"] > means["sliding-window:frames=3"]
    paired = summary["policies"]["sliding-window:frames=3"]["paired"]["cache-tokens"]
    assert paired["mean"] == means["sliding-window:frames=3"] - means["full"] and paired["resolved"] is True
    assert summary["policies"]["full"]["metrics_not_applicable"] == ["tokentrim-triggers"]
    assert "tokentrim-triggers" not in (out / "summary.md").read_text().split("## Metrics")[0]
