"""``results.jsonl``: one line per finished job, appended whole, read back whole and checked.

Each job appends its line only after its artifacts are in place, with one ``write`` of the whole line to a
file opened for appending, then ``fsync``. Reading back, a trailing partial line (a crash in the middle of a
write) is ignored, and it is cut off before the next append, so a killed run resumes. Any other line that
is not a record of this comparison is damage: :class:`~cachepolicy.errors.DamagedFolderError` names the file
and the line.

A line is a finished job (``"status": "done"``, or no status in lines written before failures were
recorded) with its metrics, curves and its policies' numeric trace fields (``trace_fields``, absent in
older lines), or a failed job (``"status": "failed"``) with its error. A job that failed is run again by
the next run of the comparison, whose line then takes its place.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cachepolicy.errors import DamagedFolderError
from cachepolicy.outputs import read_jsonl

logger = logging.getLogger(__name__)

#: what a line must hold: field -> allowed types
_FIELDS: dict[str, tuple[type, ...]] = {"job_id": (str,), "policy": (str,), "prompt": (str,), "seed": (int,)}
_DONE_FIELDS: dict[str, tuple[type, ...]] = {"metrics": (dict,), "curves": (dict,)}
_STATUSES = ("done", "failed")


def record_status(record: Mapping[str, Any]) -> str:
    """``"done"`` or ``"failed"`` (lines without a status are finished jobs)."""
    return record.get("status", "done")


def record_problem(record: Mapping[str, Any]) -> str | None:
    """What makes ``record`` not a results line, or None when it is one."""
    status = record.get("status", "done")
    if status not in _STATUSES:
        return f"status {status!r} is none of {', '.join(_STATUSES)}"
    fields = dict(_FIELDS, **(_DONE_FIELDS if status == "done" else {"error": (str,)}))
    for name, types in fields.items():
        if name not in record:
            return f"no {name!r}"
        value = record[name]
        if not isinstance(value, types) or isinstance(value, bool):
            return f"{name!r} is {type(value).__name__} {value!r:.60}, not {' or '.join(t.__name__ for t in types)}"
    if "model" in record and not isinstance(record["model"], str):
        return f"'model' is {type(record['model']).__name__}, not str"
    for name, value in record.get("metrics", {}).items():
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            return f"metric {name!r} is {type(value).__name__} {value!r:.60}, not a number"
    for name, curve in record.get("curves", {}).items():
        if not _numbers(curve):
            return f"curve {name!r} is not a list of numbers"
    fields = record.get("trace_fields", {})  # absent in lines written before policies' trace fields
    if not isinstance(fields, dict):
        return f"'trace_fields' is {type(fields).__name__}, not dict"
    for name, field in fields.items():
        if (not isinstance(field, dict) or not _number(field.get("value")) or not _numbers(field.get("per_chunk"))
                or not (_numbers(field.get("range")) and len(field["range"]) == 2)):
            return f"trace field {name!r} is not {{'value': number, 'per_chunk': [numbers], 'range': [low, high]}}"
    return None


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(map(_number, values))


class ResultsStore:
    """``results.jsonl``: whole lines only, appended atomically, read back checked."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self, config: Any = None) -> list[dict[str, Any]]:
        """One line per job, in the order jobs first appear: its first finished line, else its last failed
        one. With ``config`` (a :class:`~cachepolicy.compare.config.CompareConfig`) every line must be a job
        of its grid. Raises :class:`DamagedFolderError` naming the first damaged line."""
        if not self.path.exists():
            return []
        grid = None
        if config is not None:
            grid = {(job.model, job.policy, job.prompt, job.seed) for job in config.jobs()}
        chosen: dict[str, dict[str, Any]] = {}
        for number, record in read_jsonl(self.path):
            problem = record_problem(record)
            if problem is None and grid is not None:
                key = (record.get("model", config.models[0]), record["policy"], record["prompt"], record["seed"])
                if key not in grid:
                    problem = (f"job (model {key[0]!r}, policy {key[1]!r}, prompt {key[2]!r}, seed {key[3]}) is not "
                               f"in the configuration of config.json")
            if problem is not None:
                raise DamagedFolderError(self.path, problem, line=number)
            previous = chosen.get(record["job_id"])
            if previous is None or record_status(previous) == "failed":
                chosen[record["job_id"]] = record
            elif record_status(record) == "done":
                logger.warning("%s line %d repeats job %s; the first line is kept", self.path, number,
                               record["job_id"])
        return list(chosen.values())

    def repair(self) -> None:
        """Cut a trailing partial line so the next append starts on a line of its own."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
            logger.warning("cut a partial last line from %s", self.path)

    def append(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line, written whole with one ``write``, then ``fsync``."""
        line = (json.dumps(record, sort_keys=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # pragma: no cover - regular files write whole small buffers
                raise OSError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)
