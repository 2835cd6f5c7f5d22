"""One job: run it, write its artifacts, return its results line (top-level, so executors can ship it)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from cachepolicy.compare.checks import recipe_specs
from cachepolicy.compare.config import Job
from cachepolicy.compare.loading import load_model_cached
from cachepolicy.errors import CachePolicyError

logger = logging.getLogger(__name__)


def preview_frames(adapter: Any, latents: Any) -> tuple[Any, Any]:
    """``(decoded [T', 3, H', W'] in [0, 1] or None, uint8 preview [T', H'', W'', 3])`` of one sample.

    Without a decoder the preview shows the first three latent channels, normalised over the video and
    enlarged 8x (nearest), and says so in the report.
    """
    import torch

    batch = latents.unsqueeze(0)
    try:
        frames = adapter.decode(batch)[0].float().clamp(0, 1)
        decoded = frames
    except NotImplementedError:
        decoded = None
        channels = latents[:3] if latents.shape[0] >= 3 else latents[:1].expand(3, -1, -1, -1)
        low, high = channels.amin(), channels.amax()
        frames = ((channels - low) / (high - low + 1e-8)).permute(1, 0, 2, 3)  # [T, 3, H, W]
    scale = max(1, 128 // max(frames.shape[-2:]))
    if scale > 1:
        frames = torch.nn.functional.interpolate(frames, scale_factor=scale, mode="nearest")
    preview = (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return decoded, preview


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one job and write its artifacts; returns its results line, a failed job's line (with its error)
    when the job raises. Stops (``KeyboardInterrupt``) go through. Top-level so executors can ship it."""
    job = Job(**payload["job"])
    started = time.perf_counter()
    try:
        return _run_job(job, payload)
    except Exception as exc:  # noqa: BLE001 - any failure of one job is recorded, the others still run
        logger.debug("job %s failed", job.id, exc_info=True)
        record: dict[str, Any] = {"job_id": job.id, "model": job.model, "policy": job.policy, "prompt": job.prompt,
                                  "seed": job.seed, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                  "seconds": time.perf_counter() - started}
        for name in ("policy", "hook", "distribution"):  # a policy hook's failure names the policy to blame
            if getattr(exc, name, None) is not None and isinstance(exc, CachePolicyError):
                record[f"failed_{name}"] = getattr(exc, name)
        return record


def _write_job_folder(folder: Path, result: Any, preview: Any) -> None:
    """Write a job's artifacts into a temporary folder beside ``folder``, then put it in its place."""
    import io

    import numpy as np

    from cachepolicy.outputs import atomic_write_bytes, save_latents

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_latents(tmp / "latents.safetensors", result.latents)
    atomic_write_bytes(tmp / "trace.jsonl", "".join(json.dumps(r) + "\n" for r in result.trace).encode())
    buffer = io.BytesIO()
    np.save(buffer, preview)
    atomic_write_bytes(tmp / "preview.npy", buffer.getvalue())
    if folder.exists():  # an earlier attempt of this job (killed before its line, or failed)
        from cachepolicy.folders import deferred_stops

        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        with deferred_stops():
            os.replace(folder, old)
            os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def _run_job(job: Job, payload: dict[str, Any]) -> dict[str, Any]:
    from cachepolicy.api import build_policies
    from cachepolicy.engine import RolloutConfig, Session
    from cachepolicy.metrics import JobData, policy_trace_fields
    from cachepolicy.registry import get_registry

    adapter = load_model_cached(job.model, payload["model_options"], payload["load_token"])
    recipe_name = payload.get("recipe")
    policies = build_policies(*recipe_specs(recipe_name, job.policy))
    if recipe_name is not None:
        from cachepolicy.recipes import get_recipe

        recipe = get_recipe(recipe_name)
    else:
        recipe = None
    config = RolloutConfig(num_chunks=payload["num_chunks"], prompts=(job.prompt,), seeds=(job.seed,),
                           recipe=recipe)
    session = Session(adapter, policies, config, progress=payload.get("progress", False))
    started = time.perf_counter()
    result = session.run()
    seconds = time.perf_counter() - started

    latents = result.latents[0].float()
    decoded, preview = preview_frames(adapter, latents)
    _write_job_folder(Path(payload["out"]) / "jobs" / job.id, result, preview)

    try:
        adapter.token_grid(latents[:, :1].unsqueeze(0))
        token_grid = adapter.token_grid
    except NotImplementedError:
        token_grid = None
    data = JobData(latents=latents, frames=decoded, trace=result.trace,
                   frames_per_chunk=adapter.info.frames_per_chunk, token_grid=token_grid, prompt=job.prompt,
                   seed=job.seed, policy=job.policy,
                   ground_truth=adapter.ground_truth(job.prompt, job.seed, latents.shape[1]))
    by_spec = {policy.spec: policy for policy in session.policies}
    registry = get_registry()
    metrics, curves = {}, {}
    for name in payload["metrics"]:
        metric = registry.metric(name)(payload["metric_options"].get(name))
        value = metric.compute(data)
        metrics[name] = value.value
        if value.per_chunk is not None:
            curves[name] = list(value.per_chunk)
    return {
        "job_id": job.id,
        "model": job.model,
        "weights": adapter.weights_id(),
        "policy": job.policy,
        "policy_resolved": "+".join(p.spec for p in policies),
        "prompt": job.prompt,
        "seed": job.seed,
        "status": "done",
        "metrics": metrics,
        "curves": curves,
        "trace_fields": policy_trace_fields(result.trace, {field: by_spec[spec] for field, spec
                                                           in session.trace_sources.items()}),
        "preview_decoded": decoded is not None,
        "chunks": len(result.trace),
        "seconds": seconds,
    }
