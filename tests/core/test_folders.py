"""Folder ownership: the lock names its holder and refuses a second one, a dead holder's lock is recovered, a
replacement is swapped in whole and a swap cut short is repaired."""

from __future__ import annotations

import json
import os
import signal

import pytest

from cachepolicy.errors import FolderBusyError, StopRequested
from cachepolicy.folders import (
    FolderLock,
    deferred_stops,
    holder_of,
    lock_path,
    new_staging,
    recover_leftovers,
    request_stop,
    swap_in,
)


def test_the_lock_names_its_holder_and_refuses_a_second_one(tmp_path):
    out = tmp_path / "out"
    with FolderLock(out, "cachepolicy compare") as lock:
        assert lock_path(out) == tmp_path / ".out.lock" and lock.stale is None
        holder = holder_of(out)
        assert holder["pid"] == os.getpid() and holder["command"] == "cachepolicy compare"
        with pytest.raises(FolderBusyError, match=rf"{out} is being written by another cachepolicy process "
                                                  rf"\(command cachepolicy compare, pid {os.getpid()}, host "):
            FolderLock(out, "cachepolicy run").acquire()  # another open file: refused even in this process
        assert not out.exists()  # the lock lives beside the folder
    assert not lock_path(out).exists() and holder_of(out) is None


def test_a_lock_left_by_a_dead_process_is_recovered_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    dead = {"pid": 999999, "host": "elsewhere", "started": "2020-01-01T00:00:00", "command": "cachepolicy run"}
    lock_path(out).write_text(json.dumps(dead))  # the file is there, nobody holds its flock
    assert holder_of(out) is None
    with caplog.at_level("WARNING"), FolderLock(out, "cachepolicy compare") as lock:
        assert lock.stale == dead
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert "left locked by command cachepolicy run, pid 999999, host elsewhere" in caplog.text


def test_swap_in_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "video.gif").write_text("old")
    (out / "run.json").write_text("old")
    stage = new_staging(out)
    assert stage.parent == tmp_path and stage.name.startswith(".out.new-")
    (stage / "run.json").write_text("new")
    swap_in(stage, out)
    assert sorted(p.name for p in out.iterdir()) == ["run.json"] and (out / "run.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_recovery_puts_back_a_folder_whose_swap_was_cut_and_removes_unfinished_replacements(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.old-1234"
    old.mkdir()
    (old / "run.json").write_text("old")
    (tmp_path / ".out.new-5678").mkdir()
    (tmp_path / ".other.new-5678").mkdir()  # another folder's: not touched
    actions = recover_leftovers(out)
    assert len(actions) == 2 and (out / "run.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == [".other.new-5678", "out"]
    # the swap finished but its old copy is still there: removed
    (tmp_path / ".out.old-9").mkdir()
    recover_leftovers(out)
    assert sorted(os.listdir(tmp_path)) == [".other.new-5678", "out"] and (out / "run.json").read_text() == "old"


def test_stops_wait_until_a_swap_is_done():
    previous = signal.signal(signal.SIGHUP, lambda number, frame: request_stop("SIGHUP"))
    steps = []
    try:
        with pytest.raises(StopRequested, match="SIGHUP"):
            with deferred_stops():
                os.kill(os.getpid(), signal.SIGHUP)
                steps.append("first rename")
                steps.append("second rename")
        assert steps == ["first rename", "second rename"]
        with pytest.raises(StopRequested):  # outside a deferred block a stop lands at once
            os.kill(os.getpid(), signal.SIGHUP)
            steps.append("never")
        assert steps[-1] != "never"
    finally:
        signal.signal(signal.SIGHUP, previous)
