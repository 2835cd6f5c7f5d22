"""A second writer on a folder is refused while the first runs, and the lock of a killed writer is recovered
(real processes)."""

from __future__ import annotations

import json
import os
import socket

from cachepolicy.folders import lock_path
from tests.reliability.processes import CliProcess, run_cli, wait_until

COMPARE = ["compare", "tiny-wan", "--policies", "full; sliding-window:frames=3", "--prompts", "a red fox",
           "--seeds", "0-3", "--chunks", "60", "--metrics", "cache-tokens", "--no-progress"]


def _holder(folder):
    try:
        return json.loads(lock_path(folder).read_text())
    except (OSError, ValueError):
        return None


def test_a_second_writer_is_refused_and_a_dead_writers_lock_recovered(tmp_path):
    out = tmp_path / "cmp"
    first = CliProcess([*COMPARE, "--out", out], tmp_path / "logs")
    try:
        assert wait_until(lambda: _holder(out) is not None and (out / "results.jsonl").exists(), first), first.stderr
        holder = _holder(out)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        assert holder["command"] == "cachepolicy compare" and holder["started"]
        before = (out / "results.jsonl").read_bytes()

        # the same command, the same with --force (which would archive), a report, a run: all refused at once
        for argv in ([*COMPARE, "--out", out], [*COMPARE, "--seeds", "0", "--out", out, "--force"],
                     ["report", out], ["run", "tiny-wan", "--chunks", "1", "--out", out, "--force"]):
            second = run_cli(argv, tmp_path / "logs")
            assert second.process.exitcode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
            assert f"{out} is being written by another cachepolicy process" in lines[0]
            assert f"pid {first.pid}" in lines[0] and "command cachepolicy compare" in lines[0]
            assert first.alive()
        assert not list(out.glob("archive-*"))
        assert (out / "results.jsonl").read_bytes()[:len(before)] == before
    finally:
        first.send("SIGKILL")
        first.wait()

    # killed: the kernel dropped its lock, the file still names it; the next writer takes over and says so
    assert _holder(out)["pid"] == first.pid
    killed = (out / "results.jsonl").read_bytes()
    small = ["compare", "tiny-wan", "--policies", "full", "--prompts", "a red fox", "--chunks", "1",
             "--metrics", "cache-tokens", "--no-progress", "--out", out, "--force"]
    after = run_cli(small, tmp_path / "logs")
    assert after.process.exitcode == 0, after.stderr
    assert f"was left locked by command cachepolicy compare, pid {first.pid}" in after.stderr
    assert "which is no longer running: lock recovered" in after.stderr
    assert not lock_path(out).exists()
    assert [a.read_bytes() for a in out.glob("archive-*/results.jsonl")] == [killed]
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".cmp.")]
