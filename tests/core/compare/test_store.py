"""The results store alone: append, read back checked, resume (failed jobs run again), archive, leftovers."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachepolicy.compare import CompareConfig, ResultsStore, prepare_folder
from cachepolicy.compare.folder import read_folder, recover
from cachepolicy.errors import CompareConfigError, DamagedFolderError

CONFIG = CompareConfig(model="tiny-wan", policies=["full", "sliding-window:frames=3"], prompts=["a red fox"],
                       seeds=[0, 1], num_chunks=1, metrics=["cache-tokens"])


def _done(job, value=1.0):
    return {"job_id": job.id, "model": job.model, "policy": job.policy, "prompt": job.prompt, "seed": job.seed,
            "status": "done", "metrics": {"cache-tokens": value}, "curves": {"cache-tokens": [value]}}


def _failed(job, error="NonFiniteOutputError: boom"):
    return {"job_id": job.id, "model": job.model, "policy": job.policy, "prompt": job.prompt, "seed": job.seed,
            "status": "failed", "error": error}


@settings(max_examples=40, deadline=None)
@given(appends=st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=12),
       torn=st.binary(max_size=40).filter(lambda b: b"\n" not in b))
def test_a_job_reads_back_as_its_first_finished_line_else_its_last_failure(tmp_path_factory, appends, torn):
    store = ResultsStore(tmp_path_factory.mktemp("store") / "results.jsonl")
    jobs = CONFIG.jobs()
    want = {}
    for index, (job_index, ok) in enumerate(appends):
        job = jobs[job_index]
        record = _done(job, float(index)) if ok else _failed(job, f"error {index}")
        store.append(record)
        if job.id not in want or (want[job.id]["status"] == "failed"):
            want[job.id] = record
    with open(store.path, "ab") as handle:  # whatever a killed write left
        handle.write(torn)
    records = store.load(CONFIG)
    assert {r["job_id"]: r for r in records} == want
    assert [r["job_id"] for r in records] == list(dict.fromkeys(jobs[i].id for i, _ in appends))
    store.repair()
    assert store.path.read_bytes().endswith(b"\n") or not store.path.read_bytes()


@pytest.mark.parametrize("line, problem", [
    ('{"job_id": "x"', "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 0}', "no 'metrics'"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": "0", "metrics": {}, "curves": {}}',
     "'seed' is str"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 0, "status": "weird"}', "status 'weird'"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 0, "status": "failed"}', "no 'error'"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 0, "metrics": {"m": [1]}, "curves": {}}',
     "metric 'm' is list"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 0, "metrics": {}, "curves": {"m": 3}}',
     "curve 'm' is not a list"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 9, "metrics": {}, "curves": {}}',
     "seed 9) is not in the configuration"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 0, "metrics": {}, "curves": {}, '
     '"trace_fields": []}', "'trace_fields' is list, not dict"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 0, "metrics": {}, "curves": {}, '
     '"trace_fields": {"t.f": {"value": 1, "per_chunk": ["a"], "range": [0, null]}}}', "trace field 't.f' is not"),
    ('{"job_id": "x", "policy": "full", "prompt": "a red fox", "seed": 0, "metrics": {}, "curves": {}, '
     '"trace_fields": {"t.f": {"value": 1, "per_chunk": [1], "range": [0]}}}', "trace field 't.f' is not"),
])
def test_a_damaged_line_is_named_with_its_number(tmp_path, line, problem):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(_done(CONFIG.jobs()[0]))
    with open(store.path, "a") as handle:
        handle.write(line + "\n" + json.dumps(_done(CONFIG.jobs()[1])) + "\n")
    with pytest.raises(DamagedFolderError, match=r"results.jsonl line 2 is damaged: ") as info:
        store.load(CONFIG)
    assert problem in str(info.value) and info.value.line == 2


def test_prepare_resumes_refuses_and_archives_with_force(tmp_path):
    out = tmp_path / "cmp"
    store = prepare_folder(CONFIG, out, force=False)
    store.append(_done(CONFIG.jobs()[0]))
    assert prepare_folder(CONFIG, out, force=False).load(CONFIG) == [_done(CONFIG.jobs()[0])]  # resumed
    (out / "config.json").write_text("[garbage")
    with pytest.raises(DamagedFolderError, match=r"config.json is damaged: not JSON .*pass --force to archive"):
        prepare_folder(CONFIG, out, force=False)
    with pytest.raises(DamagedFolderError, match="config.json is damaged"):
        read_folder(out)
    before = store.path.read_bytes()
    prepare_folder(CONFIG, out, force=True)  # --force works on a damaged folder: archived whole
    (archive,) = out.glob("archive-*")
    assert (archive / "config.json").read_text() == "[garbage" and (archive / "results.jsonl").read_bytes() == before
    assert read_folder(out) == (CONFIG, [])
    (out / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CompareConfigError, match=r"holds files that are not part of a comparison \(notes.txt\)"):
        prepare_folder(CONFIG, other, force=False)


def test_an_archive_or_a_job_folder_cut_short_by_a_kill_is_finished_or_removed(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    partial = out / ".archive-20260101-000000.partial"
    partial.mkdir()
    (partial / "config.json").write_text("moved before the kill")
    (out / "results.jsonl").write_text("not moved yet\n")
    (out / "jobs" / ".abc.tmp-1234").mkdir(parents=True)
    (out / "jobs" / "0123456789abcdef").mkdir()
    recover(out)
    archive = out / "archive-20260101-000000"
    assert sorted(os.listdir(archive)) == ["config.json", "jobs", "results.jsonl"]
    assert os.listdir(out) == ["archive-20260101-000000"]
    assert os.listdir(archive / "jobs") == ["0123456789abcdef"]  # the killed job's temporary folder is gone
