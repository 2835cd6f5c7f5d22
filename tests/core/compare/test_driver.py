"""A comparison with failing jobs: each is recorded as failed while the others run, the report is still written,
and the next run tries the failed jobs again."""

from __future__ import annotations

import json

from cachepolicy.cli import main
from cachepolicy.compare import CompareConfig, ResultsStore, run_compare

FAULT = "fault:chunk=0,target=latent,mode=constant,scale=3e38"  # the next chunk's model output overflows


def test_failing_jobs_are_recorded_the_others_run_and_the_report_is_written(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "tiny-wan", "--policies", f"full; {FAULT}", "--prompts", "a red fox", "--seeds", "0-1",
            "--chunks", "3", "--metrics", "cache-tokens,latent-drift", "--out", str(out), "--no-progress"]
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        f"error: 2 of 4 jobs failed (listed in {out / 'summary.md'}); rerun the same command to try them again")
    records = ResultsStore(out / "results.jsonl").load()
    assert [(r["policy"], r["status"]) for r in records] == [("full", "done")] * 2 + [(FAULT, "failed")] * 2
    assert all(r["error"].startswith("NonFiniteOutputError: the model produced non-finite values at chunk 1")
               for r in records[2:])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["jobs_done"], summary["jobs_failed"]) == (2, 2)
    assert summary["policies"]["full"]["jobs"] == 2 and summary["policies"][FAULT]["jobs"] == 0
    assert "## Failed jobs (2," in (out / "summary.md").read_text() and "## Failed jobs" in captured.out
    assert "<h2>Failed jobs</h2>" in (out / "report.html").read_text()
    assert sorted(p.name for p in (out / "jobs").iterdir()) == sorted(r["job_id"] for r in records[:2])

    lines = len((out / "results.jsonl").read_text().splitlines())
    assert main(argv) == 3  # the failed jobs run again (and fail again); the finished ones do not
    assert len((out / "results.jsonl").read_text().splitlines()) == lines + 2
    assert len(ResultsStore(out / "results.jsonl").load()) == 4


def test_a_job_that_failed_once_is_replaced_by_its_finished_line(tmp_path, monkeypatch, broken_policy):
    config = CompareConfig(model="tiny-wan", policies=["full", "broken:chunk=1"], prompts=["a red fox"],
                           seeds=[0], num_chunks=2, metrics=["cache-tokens"])
    summary = run_compare(config, tmp_path / "cmp")
    assert summary["jobs_failed"] == 1 and summary["failed"][0]["policy"] == "broken:chunk=1"
    assert summary["failed"][0]["error"] == ("PolicyHookError: policy 'broken:chunk=1' failed in "
                                             "cachepolicy_chunk_start: KeyError: 'oops'")
    failed = [r for r in ResultsStore(tmp_path / "cmp" / "results.jsonl").load() if r["status"] == "failed"]
    assert (failed[0]["failed_policy"], failed[0]["failed_hook"]) == ("broken:chunk=1", "cachepolicy_chunk_start")
    monkeypatch.setattr(broken_policy, "cachepolicy_chunk_start", lambda self, session, chunk: None)  # fixed
    summary = run_compare(config, tmp_path / "cmp")
    assert (summary["jobs_done"], summary["jobs_failed"]) == (2, 0)
    records = ResultsStore(tmp_path / "cmp" / "results.jsonl").load()
    assert [r["status"] for r in records] == ["done", "done"]
