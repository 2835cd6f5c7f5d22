"""What a run writes: permissions like any other file, and a reader that names what is damaged."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cachepolicy.api import run_to_dir
from cachepolicy.errors import DamagedFolderError
from cachepolicy.outputs import atomic_write_bytes, new_file_mode, read_jsonl, read_run


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_written_atomically_get_the_mode_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        new_file_mode.cache_clear()
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        (tmp_path / "plain.txt").write_text("x")
        assert _mode(tmp_path / "a.json") == _mode(tmp_path / "plain.txt") == 0o644
        run_to_dir("tiny-wan", "full", out=tmp_path / "run", num_chunks=1)
        for name in ("run.json", "latents.safetensors", "trace.jsonl"):
            assert _mode(tmp_path / "run" / name) == 0o644, name
    finally:
        os.umask(old)
        new_file_mode.cache_clear()


@pytest.fixture
def run_folder(tmp_path):
    run_to_dir("tiny-wan", "full", out=tmp_path / "run", num_chunks=3)
    return tmp_path / "run"


def test_read_run_names_the_damaged_file_and_line(run_folder):
    latents, run, trace = read_run(run_folder)
    assert run["status"] == "completed" and len(trace) == 3 and latents.shape[2] == 9
    trace_path = run_folder / "trace.jsonl"
    lines = trace_path.read_text().splitlines()

    trace_path.write_text("\n".join([lines[0], "[1, 2]", lines[2]]) + "\n")
    with pytest.raises(DamagedFolderError, match=r"trace.jsonl line 2 is damaged: a JSON list, not an object"):
        read_run(run_folder)
    trace_path.write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")  # another order: another run's
    with pytest.raises(DamagedFolderError, match=r"trace.jsonl line 2 is damaged: chunk 2 where chunk 1 belongs"):
        read_run(run_folder)
    trace_path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # a torn last line: two chunks remain
    with pytest.raises(DamagedFolderError, match=r"2 chunks where run.json says 3"):
        read_run(run_folder)
    trace_path.write_text("\n".join(lines) + "\n")

    latents_path = run_folder / "latents.safetensors"
    data = latents_path.read_bytes()
    latents_path.write_bytes(data[:len(data) // 2])
    with pytest.raises(DamagedFolderError, match=r"latents.safetensors is damaged: not a safetensors file"):
        read_run(run_folder)
    latents_path.write_bytes(data)

    (run_folder / "run.json").write_text("{ garbage")
    with pytest.raises(DamagedFolderError, match=r"run.json is damaged: not JSON"):
        read_run(run_folder)
    (run_folder / "run.json").write_text(json.dumps({**run, "status": "done?"}))
    with pytest.raises(DamagedFolderError, match=r"status 'done\?' is none of running, completed"):
        read_run(run_folder)


def test_read_jsonl_ignores_only_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": ')
    with caplog.at_level("WARNING"):
        assert read_jsonl(path) == [(1, {"a": 1}), (3, {"a": 2})]
    assert "unfinished last line 4" in caplog.text
    path.write_bytes(b'{"a": 1}\n{"a": \n{"a": 2}\n')
    with pytest.raises(DamagedFolderError, match=r"x.jsonl line 2 is damaged: not JSON"):
        read_jsonl(path)
