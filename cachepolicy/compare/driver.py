"""The whole comparison: check, prepare the folder, run what is not done yet, write the report."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import attrs

from cachepolicy.compare.checks import check_model, validate
from cachepolicy.compare.config import CompareConfig
from cachepolicy.compare.folder import _recorded_weights, prepare_folder
from cachepolicy.compare.worker import run_job

logger = logging.getLogger(__name__)


def run_compare(config: CompareConfig, out: str | Path, *, executor: Any = None, force: bool = False,
                progress: bool = False) -> dict[str, Any]:
    """Run every job not yet in ``out/results.jsonl``, then write the report. Returns ``summary.json``."""
    from cachepolicy.executors import LocalExecutor
    from cachepolicy.report import write_report

    validate(config)
    executor = executor or LocalExecutor()
    local = getattr(executor, "name", "") == "local"
    weights = None
    load_token = uuid.uuid4().hex
    if local:  # the jobs reuse this model, so loading it now costs nothing and fails before any job
        weights = check_model(config, load_token)
    out = Path(out)
    store = prepare_folder(config, out, force, weights)
    done = {r["job_id"] for r in store.load()}
    jobs = [job for job in config.jobs() if job.id not in done]
    if done:
        logger.info("resuming: %d of %d jobs already done", len(done), len(done) + len(jobs))
    payloads = [{
        "job": attrs.asdict(job), "model_options": dict(config.model_options),
        "num_chunks": config.num_chunks, "metrics": list(config.metrics),
        "metric_options": {k: dict(v) for k, v in config.metric_options.items()}, "out": str(out),
        "progress": progress and local, "recipe": config.recipe, "load_token": load_token,
    } for job in jobs]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(config.jobs()), initial=len(done), desc="jobs", unit="job", position=0)
    try:
        for record in executor.map_unordered(run_job, payloads):
            store.append(record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    records = store.load()
    for model, found in _recorded_weights(records).items():  # only where no check ran before the jobs
        if len(found) > 1:
            logger.warning("the results of %s in %s come from %d different weights (ids %s): rerun with --force",
                           model, out, len(found), ", ".join(sorted(found)))
    return write_report(out, config, records)
