"""The output folder of a comparison: created, resumed when it holds the same configuration and weights, or
archived whole with ``--force``; read back, checked, for a report.

The folder is written under its :class:`~cachepolicy.folders.FolderLock`, which the caller holds. An archive
is built in ``DIR/.archive-<time>.partial/`` and renamed to ``DIR/archive-<time>/`` once everything is in
it; a process killed in between leaves the partial archive, which the next writer completes. Job folders
are written as ``DIR/jobs/.<id>.tmp-*`` and renamed in place; leftovers of killed jobs are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cachepolicy.compare.config import CompareConfig
from cachepolicy.compare.store import ResultsStore, record_status
from cachepolicy.errors import CachePolicyError, CompareConfigError, DamagedFolderError
from cachepolicy.outputs import atomic_write_json, read_json_object

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
#: what a comparison writes into its folder (archives aside); ``--force`` archives these
FOLDER_ENTRIES = (CONFIG_FILE, RESULTS_FILE, "jobs", "summary.json", "summary.md", "report.html", "plots", "videos")
_FORCE_HINT = "pass --force to archive this folder's results and start over"


def _recorded_weights(records: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """``{model: weights ids its recorded jobs ran}`` (records without an id are left out)."""
    ids: dict[str, set[str]] = {}
    for record in records:
        if record.get("weights") is not None:
            ids.setdefault(record.get("model", ""), set()).add(record["weights"])
    return ids


def _changed_weights(records: Sequence[Mapping[str, Any]], weights: Mapping[str, str | None]) -> list[str]:
    """``model (old id -> new id)`` for each model whose recorded jobs ran other weights than ``weights``."""
    return [f"{model} ({', '.join(sorted(old))} -> {weights[model]})"
            for model, old in _recorded_weights(records).items()
            if weights.get(model) is not None and old != {weights[model]}]


def _archive(out: Path) -> Path:
    """Move everything the comparison wrote into a new ``archive-<time>/`` (see the module docstring)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, suffix = f"archive-{stamp}", 1
    while (out / name).exists() or (out / f".{name}.partial").exists():
        suffix += 1
        name = f"archive-{stamp}-{suffix}"
    partial = out / f".{name}.partial"
    from cachepolicy.folders import deferred_stops

    with deferred_stops():  # a stop lands before or after the archive, never in the middle
        partial.mkdir()
        return _finish_archive(out, partial)


def _finish_archive(out: Path, partial: Path) -> Path:
    for entry in FOLDER_ENTRIES:
        if (out / entry).exists():
            shutil.move(str(out / entry), str(partial / entry))
    archive = out / partial.name.removeprefix(".").removesuffix(".partial")
    os.replace(partial, archive)
    logger.warning("archived the previous results to %s", archive)
    return archive


def recover(out: Path) -> None:
    """Finish archives and remove job folders that killed processes left in ``out`` (lock held)."""
    if not out.is_dir():
        return
    jobs = out / "jobs"
    if jobs.is_dir():
        for name in os.listdir(jobs):
            if name.startswith("."):
                shutil.rmtree(jobs / name, ignore_errors=True)
    for name in sorted(os.listdir(out)):
        if name.startswith(".archive-") and name.endswith(".partial"):
            logger.warning("finishing the archive %s that a killed run started", name)
            _finish_archive(out, out / name)


def read_config(out: Path) -> CompareConfig:
    """The configuration of ``out/config.json``, checked (a damaged file raises
    :class:`DamagedFolderError`)."""
    path = out / CONFIG_FILE
    data = read_json_object(path)
    if not isinstance(data.get("config"), dict):
        raise DamagedFolderError(path, "no 'config' object")
    try:
        return CompareConfig.from_json(data["config"])
    except (CachePolicyError, TypeError, ValueError) as exc:
        raise DamagedFolderError(path, f"not a comparison's configuration ({exc})") from None


def read_folder(out: str | Path) -> tuple[CompareConfig, list[dict[str, Any]]]:
    """``(configuration, results)`` of a compare folder, every line checked against the configuration."""
    out = Path(out)
    if not (out / CONFIG_FILE).is_file():
        raise CompareConfigError(f"{out} has no {CONFIG_FILE}: not a compare output folder")
    config = read_config(out)
    return config, ResultsStore(out / RESULTS_FILE).load(config)


def _foreign(out: Path) -> list[str]:
    return sorted(name for name in os.listdir(out) if not name.startswith(".") and name not in FOLDER_ENTRIES
                  and not name.startswith("archive-"))


def prepare_folder(config: CompareConfig, out: Path, force: bool,
                   weights: Mapping[str, str | None] | None = None) -> ResultsStore:
    """Create ``out`` or check it holds this configuration, and results of the same ``weights``
    (``{model: weights id}``, as :func:`~cachepolicy.compare.checks.check_model` returns; None skips that
    check); with ``force`` archive what is there, damaged or not. Call with the folder's lock held."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recover(out)
    config_path = out / CONFIG_FILE
    store = ResultsStore(out / RESULTS_FILE)
    if config_path.exists():
        try:
            previous = read_config(out)
            same = read_json_object(config_path).get("fingerprint") == config.fingerprint
            records = store.load(previous) if same else None
        except DamagedFolderError as exc:
            if not force:
                raise DamagedFolderError(exc.path, exc.problem, line=exc.line, hint=_FORCE_HINT) from None
            _archive(out)
        else:
            if records is None:
                if not force:
                    changed = sorted(k for k, v in config.to_json().items()
                                     if previous.to_json().get(k) != v and k != "baseline")
                    raise CompareConfigError(
                        f"{out} holds results of another configuration (differs in: "
                        f"{', '.join(changed) or 'version'}); use another --out, rerun with the same settings to "
                        f"resume, or pass --force to archive the old results and start over"
                    )
                _archive(out)
            elif weights and (changed := _changed_weights(records, weights)):
                if not force:
                    raise CompareConfigError(
                        f"{out} holds results of other weights of the same configuration (weights id: "
                        f"{', '.join(changed)}); use another --out, or pass --force to archive the old results "
                        f"and start over"
                    )
                _archive(out)
    elif store.path.exists() or _foreign(out):
        if not force:
            what = f"{RESULTS_FILE} but no {CONFIG_FILE}" if store.path.exists() else (
                f"files that are not part of a comparison ({', '.join(_foreign(out)[:5])})")
            raise CompareConfigError(f"{out} holds {what}; use another --out, or pass --force to archive "
                                     f"what a comparison wrote there and start over")
        _archive(out)
    atomic_write_json(config_path, {"fingerprint": config.fingerprint, "config": config.to_json()})
    store.repair()
    return store


def failed_jobs(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records of failed jobs."""
    return [r for r in records if record_status(r) == "failed"]
