"""``run`` and ``compare`` killed at random points (SIGKILL, SIGTERM, SIGINT; real processes, hypothesis picks
the signal, the moment and whether an older run is being replaced): nothing finished is lost, no folder mixes
two runs, and the same command run again completes to the results of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cachepolicy.compare import ResultsStore
from cachepolicy.outputs import read_run
from tests.reliability.processes import CliProcess, run_cli, wait_until

CHUNKS = 10
RUN = ["run", "tiny-wan", "--chunks", str(CHUNKS), "--seed", "0", "--force"]
COMPARE = ["compare", "tiny-wan", "--policies", "full; sliding-window:frames=3", "--prompts", "a red fox",
           "--seeds", "0-1", "--chunks", "6", "--metrics", "cache-tokens,latent-drift,flicker"]
SIGNALS = st.sampled_from(["SIGKILL", "SIGTERM", "SIGINT"])
EXIT = {"SIGTERM": 128 + 15, "SIGINT": 128 + 2}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted results: a run (seed 0), an older run to replace (seed 5), a comparison."""
    base = tmp_path_factory.mktemp("reference")
    for argv, progress in (([*RUN, "--out", base / "run"], f"chunk {CHUNKS} of {CHUNKS} done in"),
                           ([*RUN, "--seed", "5", "--out", base / "old"], "chunk 1 of"),
                           ([*COMPARE, "--out", base / "cmp"], "job 4 of 4 done in")):
        process = run_cli(argv, base / "logs")
        assert process.process.exitcode == 0, process.stderr
        assert f"INFO cachepolicy.progress: {progress}" in process.stderr  # no terminal: a line per chunk or job
    latents = load_file(base / "run" / "latents.safetensors")["latents"]
    records = {r["job_id"]: r for r in ResultsStore(base / "cmp" / "results.jsonl").load()}
    assert len(records) == 4
    return {"latents": latents, "old": base / "old", "records": records}


def _trace_lines(parent: Path) -> int:
    """Chunks the run being written has finished (in the folder, or in its replacement beside it)."""
    counts = [len(p.read_bytes().splitlines()) for p in parent.glob("*/trace.jsonl")]
    counts += [len(p.read_bytes().splitlines()) for p in parent.glob(".run.new-*/trace.jsonl")]
    return max(counts, default=0)


@settings(max_examples=10, deadline=None)
@given(signal=SIGNALS, replace=st.booleans(), chunks=st.integers(0, CHUNKS), delay=st.floats(0.0, 0.2))
def test_run_killed_at_any_point(tmp_path_factory, reference, signal, replace, chunks, delay):
    parent = tmp_path_factory.mktemp("run")
    out = parent / "run"
    old = None
    if replace:  # a finished older run that --force replaces
        shutil.copytree(reference["old"], out)
        old = _snapshot(out)
    process = CliProcess([*RUN, "--out", out], parent / "logs")
    wait_until(lambda: _trace_lines(parent) >= chunks, process)
    time.sleep(delay)
    process.send(signal)
    code = process.wait()

    if out.exists():
        latents, run, trace = read_run(out)  # every file readable, and they agree with each other
        event(f"{signal}: {'older run' if run['seeds'] == [5] else run['status']}")
        if run["seeds"] == [5]:  # the older run, whole and untouched
            assert _snapshot(out) == old
        else:
            files = {name for name in _snapshot(out) if not name.startswith(".")}  # ".*": a killed write's temp file
            assert run["seeds"] == [0] and files <= {"run.json", "trace.jsonl", "latents.safetensors"}
            if run["status"] == "running":  # only a process killed outright leaves a run saying "running"
                assert signal == "SIGKILL" and code == -9
                assert "latents.safetensors" not in files  # a running run has none yet: these are another's
            else:
                assert run["status"] in ("completed", "interrupted"), run
                assert run["chunks_completed"] == len(trace)
                done = run["chunks_completed"] * 3
                assert torch.equal(latents, reference["latents"][:, :, :done])  # what finished, exactly
                if run["status"] == "interrupted":
                    assert code == EXIT[signal]
    elif replace:  # killed between the two renames of the swap: the older run waits whole beside, put back next
        assert signal == "SIGKILL"
        (kept,) = parent.glob(".run.old-*")
        assert _snapshot(kept) == old

    again = run_cli([*RUN, "--out", out], parent / "logs")
    assert again.process.exitcode == 0, again.stderr
    latents, run, trace = read_run(out)
    assert run["status"] == "completed" and len(trace) == CHUNKS
    assert torch.equal(latents, reference["latents"])
    assert _leftovers(parent, "run") == []  # no lock, no half-built replacement, no old copy


@settings(max_examples=6, deadline=None)
@given(signal=SIGNALS, jobs=st.integers(0, 3), delay=st.floats(0.0, 0.3))
def test_compare_killed_at_any_point(tmp_path_factory, reference, signal, jobs, delay):
    parent = tmp_path_factory.mktemp("cmp")
    out = parent / "cmp"
    results = out / "results.jsonl"
    process = CliProcess([*COMPARE, "--out", out], parent / "logs")
    wait_until(lambda: results.exists() and len(results.read_bytes().splitlines()) >= jobs, process)
    time.sleep(delay)
    process.send(signal)
    code = process.wait()
    if signal != "SIGKILL" and code not in (0, -2, -15):  # not killed before the handlers were in place
        assert code == EXIT[signal], process.stderr
        assert "rerun the same command to resume" in process.stderr

    kept = ResultsStore(results).load() if results.exists() else []
    event(f"{signal}: {len(kept)} jobs kept")
    for record in kept:  # whatever finished is a job of the reference, with the reference's numbers
        assert record["metrics"] == reference["records"][record["job_id"]]["metrics"]
        assert (out / "jobs" / record["job_id"] / "preview.npy").is_file()
    kept_lines = results.read_bytes().split(b"\n")[:len(kept)] if kept else []

    again = run_cli([*COMPARE, "--out", out], parent / "logs")
    assert again.process.exitcode == 0, again.stderr
    lines = results.read_bytes().split(b"\n")
    assert lines[:len(kept_lines)] == kept_lines  # nothing finished is lost or rewritten
    records = ResultsStore(results).load()
    assert len([line for line in lines if line.strip()]) == len(records) == 4  # every job exactly once
    for record in records:
        want = reference["records"][record["job_id"]]
        assert (record["metrics"], record["curves"]) == (want["metrics"], want["curves"])
    assert json.loads((out / "summary.json").read_text())["jobs_done"] == 4
    assert sorted(os.listdir(out / "jobs")) == sorted(reference["records"])  # no half-written job folder
    assert _leftovers(parent, "cmp") == []
