"""The output folder of a comparison: created, or resumed when it holds the same configuration and weights,
or archived with ``--force``."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cachepolicy.compare.config import CompareConfig
from cachepolicy.compare.store import ResultsStore
from cachepolicy.errors import CompareConfigError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"


def _recorded_weights(records: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """``{model: weights ids its recorded jobs ran}`` (records without an id are left out)."""
    ids: dict[str, set[str]] = {}
    for record in records:
        if record.get("weights") is not None:
            ids.setdefault(record["model"], set()).add(record["weights"])
    return ids


def _changed_weights(records: Sequence[Mapping[str, Any]], weights: Mapping[str, str | None]) -> list[str]:
    """``model (old id -> new id)`` for each model whose recorded jobs ran other weights than ``weights``."""
    return [f"{model} ({', '.join(sorted(old))} -> {weights[model]})"
            for model, old in _recorded_weights(records).items()
            if weights.get(model) is not None and old != {weights[model]}]


def _archive(out: Path) -> None:
    archive = out / f"archive-{time.strftime('%Y%m%d-%H%M%S')}"
    archive.mkdir()
    for name in (CONFIG_FILE, RESULTS_FILE, "jobs", "summary.json", "summary.md", "report.html",
                 "plots", "videos"):
        if (out / name).exists():
            shutil.move(str(out / name), str(archive / name))
    logger.warning("archived the previous results to %s", archive)


def prepare_folder(config: CompareConfig, out: Path, force: bool,
                   weights: Mapping[str, str | None] | None = None) -> ResultsStore:
    """Create ``out`` or check it holds this configuration, and results of the same ``weights``
    (``{model: weights id}``, as :func:`check_model` returns; None skips that check); with ``force``
    archive what is there."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / CONFIG_FILE
    store = ResultsStore(out / RESULTS_FILE)
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous.get("fingerprint") != config.fingerprint:
            try:  # an older config.json (one "model") is compared in today's form
                before = CompareConfig.from_json(previous.get("config", {})).to_json()
            except (TypeError, ValueError):
                before = previous.get("config", {})
            changed = sorted(k for k, v in config.to_json().items() if before.get(k) != v)
            if not force:
                raise CompareConfigError(
                    f"{out} holds results of another configuration (differs in: {', '.join(changed) or 'version'}); "
                    f"use another --out, rerun with the same settings to resume, or pass --force to archive "
                    f"the old results and start over"
                )
            _archive(out)
        elif weights and store.path.exists() and (changed := _changed_weights(store.load(), weights)):
            if not force:
                raise CompareConfigError(
                    f"{out} holds results of other weights of the same configuration (weights id: "
                    f"{', '.join(changed)}); use another --out, or pass --force to archive the old results "
                    f"and start over"
                )
            _archive(out)
    elif store.path.exists():
        raise CompareConfigError(f"{out} holds {RESULTS_FILE} but no {CONFIG_FILE}; use another --out")
    from cachepolicy.outputs import atomic_write_json

    atomic_write_json(config_path, {"fingerprint": config.fingerprint, "config": config.to_json()})
    store.repair()
    return store
