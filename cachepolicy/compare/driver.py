"""The whole comparison: check, take the folder, run what is not done yet, write the report."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import attrs

from cachepolicy.compare.checks import check_model, validate
from cachepolicy.compare.config import CompareConfig
from cachepolicy.compare.folder import _recorded_weights, prepare_folder
from cachepolicy.compare.store import record_status
from cachepolicy.compare.worker import run_job

logger = logging.getLogger(__name__)
#: one line per finished job (the CLI shows them when stderr is not a terminal)
progress_logger = logging.getLogger("cachepolicy.progress")


def run_compare(config: CompareConfig, out: str | Path, *, executor: Any = None, force: bool = False,
                progress: bool = False) -> dict[str, Any]:
    """Run every job not yet done in ``out/results.jsonl``, then write the report. Returns ``summary.json``
    (its ``jobs_failed`` counts the jobs that failed; each is recorded with its error and run again by the
    next call).

    Everything is checked before ``out`` is touched; ``out`` is locked while it is written
    (:class:`~cachepolicy.folders.FolderLock`).
    """
    from cachepolicy.executors import LocalExecutor
    from cachepolicy.folders import FolderLock, holder_of
    from cachepolicy.outputs import check_writable
    from cachepolicy.report import write_report

    validate(config)
    out = Path(out)
    check_writable(out)
    if (holder := holder_of(out)) is not None:  # say so before loading any model
        from cachepolicy.errors import FolderBusyError

        raise FolderBusyError(out, holder)
    executor = executor or LocalExecutor()
    local = getattr(executor, "name", "") == "local"
    weights = None
    load_token = uuid.uuid4().hex
    if local:  # the jobs reuse this model, so loading it now costs nothing and fails before any job
        weights = check_model(config, load_token)
    with FolderLock(out, "cachepolicy compare"):
        store = prepare_folder(config, out, force, weights)
        done = {r["job_id"] for r in store.load(config) if record_status(r) == "done"}
        jobs = [job for job in config.jobs() if job.id not in done]
        total = len(config.jobs())
        if done:
            logger.info("resuming: %d of %d jobs already done", len(done), total)
        payloads = [{
            "job": attrs.asdict(job), "model_options": dict(config.model_options),
            "num_chunks": config.num_chunks, "metrics": list(config.metrics),
            "metric_options": {k: dict(v) for k, v in config.metric_options.items()}, "out": str(out),
            "progress": progress and local, "recipe": config.recipe, "load_token": load_token,
        } for job in jobs]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=len(done), desc="jobs", unit="job", position=0)
        finished = len(done)
        try:
            for record in executor.map_unordered(run_job, payloads):
                store.append(record)
                finished += 1
                _log_job(record, finished, total)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        records = store.load(config)
        for model, found in _recorded_weights(records).items():  # only where no check ran before the jobs
            if len(found) > 1:
                logger.warning("the results of %s in %s come from %d different weights (ids %s): rerun with "
                               "--force", model, out, len(found), ", ".join(sorted(found)))
        return write_report(out, config, records)


def _log_job(record: dict[str, Any], finished: int, total: int) -> None:
    what = f"{record.get('model', '')} {record['policy']!r} prompt {record['prompt']!r} seed {record['seed']}"
    if record_status(record) == "failed":
        logger.warning("job %d of %d failed (%s): %s", finished, total, what, record["error"])
    else:
        progress_logger.info("job %d of %d done in %.1f s (%s)", finished, total, record.get("seconds", 0.0), what)
