"""The Python API; it mirrors the CLI (``cachepolicy run``).

Example::

    import cachepolicy as cp

    model = cp.load_model("tiny-wan")
    policies = cp.build_policies("attention-sink:frames=3+sliding-window:frames=6")
    result = cp.rollout(model, policies, num_chunks=8, prompts=["a red square"], seeds=[0])
    paths = cp.run_to_dir("tiny-wan", "sliding-window:frames=6", out="runs/a", num_chunks=8)
    latents, run, trace = cp.read_run("runs/a")
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cachepolicy.engine import PromptSwitch, RolloutConfig, RolloutResult, Session
from cachepolicy.errors import CachePolicyError, UnknownNameError
from cachepolicy.models import ModelAdapter, ModelEntry, Sampler
from cachepolicy.noise import NoiseSource
from cachepolicy.outputs import (
    LATENTS_FILE,
    RUN_FILE,
    TRACE_FILE,
    TraceWriter,
    atomic_write_json,
    read_run,
    save_latents,
)
from cachepolicy.policy import Policy
from cachepolicy.policy import build_policies as _build
from cachepolicy.recipes import Recipe, get_recipe, recipe_specs
from cachepolicy.registry import get_registry

logger = logging.getLogger(__name__)
#: one line per finished chunk of a run (the CLI shows them when stderr is not a terminal)
progress_logger = logging.getLogger("cachepolicy.progress")

__all__ = ["available_models", "available_policies", "build_policies", "load_model", "read_run", "rollout",
           "run_to_dir"]


def available_policies() -> dict[str, type[Policy]]:
    """Installed policy classes by name (built-ins and entry-point plugins)."""
    return dict(get_registry().policies)


def available_models() -> dict[str, ModelEntry]:
    """Installed model entries by name."""
    return dict(get_registry().models)


def load_model(name: str, **options: Any) -> ModelAdapter:
    """Load a model by registered name (``tiny-wan``) or by path to a diffusers Wan folder.

    ``options`` go to the model's loader (e.g. ``device="cuda"``, ``dtype="bfloat16"``, ``seed=0``).
    """
    registry = get_registry()
    if name not in registry.models and Path(name).is_dir():
        return registry.model("wan-diffusers").load(path=name, **options)
    _raise_if_failed_plugin(name)
    return registry.model(name).load(**options)


def build_policies(*specs: str) -> list[Policy]:
    """Policies from spec strings (``"attention-sink:frames=3+sliding-window:frames=12"``); several compose."""
    from cachepolicy.validation import check_policy_params

    registry = get_registry()
    try:
        policies = _build(list(specs), registry.policies)
    except UnknownNameError as exc:
        _raise_if_failed_plugin(exc.name)
        raise
    check_policy_params(policies)
    return policies


def _raise_if_failed_plugin(name: str) -> None:
    from cachepolicy.errors import PluginLoadError

    for record in get_registry().errors:
        if record.name == name:
            raise PluginLoadError(f"plugin {name!r} is installed but failed to load: {record.error}")


def rollout(model: ModelAdapter, policies: Sequence[Policy], *, num_chunks: int, prompts: Sequence[str],
            seeds: Sequence[int], sampler: Sampler | None = None, progress: bool = False,
            on_chunk: Callable[[dict[str, Any]], None] | None = None, recipe: str | Recipe | None = None,
            prompt_switches: Sequence[PromptSwitch] = (), noise: NoiseSource | None = None,
            trace_residency: bool = False) -> RolloutResult:
    """Generate ``num_chunks`` chunks for a batch of ``len(prompts)`` samples (one seed each).

    ``recipe`` (a name from :data:`cachepolicy.recipes.RECIPES` or a :class:`Recipe`) selects a system's
    loop; its policies are composed in front of ``policies`` unless one of the same name is given.
    ``prompt_switches`` change the prompts from a chunk on (LongLive's recipe re-caches there). ``noise`` and
    ``trace_residency`` as in :class:`~cachepolicy.engine.RolloutConfig`.
    """
    chosen = get_recipe(recipe) if recipe is not None else None
    policies = _with_recipe_policies(chosen, list(policies))
    config = RolloutConfig(num_chunks=num_chunks, prompts=tuple(prompts), seeds=tuple(seeds), sampler=sampler,
                           recipe=chosen, prompt_switches=tuple(prompt_switches), noise=noise,
                           trace_residency=trace_residency)
    return Session(model, policies, config, on_chunk=on_chunk, progress=progress).run()


def _with_recipe_policies(recipe: Recipe | None, policies: list[Policy]) -> list[Policy]:
    """The recipe's policies (those whose name the caller does not give) followed by ``policies``."""
    extra = recipe_specs(recipe, {p.name for p in policies})
    return (build_policies(*extra) if extra else []) + policies


def _write_trace(folder: Path, trace: Sequence[dict[str, Any]]) -> None:
    """``trace.jsonl`` rewritten whole from the session's records (what was appended chunk by chunk, exactly)."""
    from cachepolicy.outputs import atomic_write_bytes

    atomic_write_bytes(folder / TRACE_FILE, "".join(json.dumps(r) + "\n" for r in trace).encode())


def _versions() -> dict[str, str]:
    import diffusers
    import torch

    from cachepolicy import __version__

    return {"cachepolicy": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def _write_videos(adapter: ModelAdapter, latents: Any, folder: Path, columns: int | None = None) -> list[Path]:
    """``video.mp4`` and ``video.gif`` of the decoded latents (``columns`` samples per row, None: one row),
    or nothing for a model without a decoder."""
    from cachepolicy.outputs import save_videos

    try:
        frames = adapter.decode(latents)
    except NotImplementedError:
        logger.info("model %s has no decoder: no video written", adapter.info.name)
        return []
    return save_videos(folder, frames, columns=columns)


def run_to_dir(model: str | ModelAdapter, policies: str | Sequence[str] | Sequence[Policy], *, out: str | Path,
               num_chunks: int, seed: int = 0, batch: int = 1, prompts: Sequence[str] | None = None,
               model_options: dict[str, Any] | None = None, force: bool = False,
               progress: bool = False, recipe: str | Recipe | None = None,
               prompt_switches: Sequence[PromptSwitch] = (), video_columns: int | None = None,
               trace_residency: bool = False, noise: NoiseSource | None = None) -> dict[str, Any]:
    """One rollout written to ``out`` (``run.json``, ``trace.jsonl``, ``latents.safetensors``, and
    ``video.mp4`` / ``video.gif`` of the decoded frames when the model has a decoder).

    Samples get seeds ``seed, seed+1, ...``; ``prompts`` has one entry per sample (a single prompt is
    repeated over the batch; None: the model's :attr:`~cachepolicy.models.ModelAdapter.default_prompt`).
    ``recipe`` and ``prompt_switches`` as in :func:`rollout`. The videos show the samples side by side,
    ``video_columns`` per row (None: all in one row).

    Everything is checked before anything is written. ``out`` is locked while the run writes it
    (:class:`~cachepolicy.folders.FolderLock`); a run that replaces another (``force``) is built beside
    it and swapped in whole when it ends. When the rollout fails or is stopped (an exception,
    ``KeyboardInterrupt``, :class:`~cachepolicy.errors.StopRequested`) the chunks finished so far are
    written, ``run.json`` says ``"status": "failed"`` or ``"interrupted"``, and the error is raised.
    """
    from cachepolicy.folders import FolderLock, new_staging, recover_leftovers, swap_in
    from cachepolicy.outputs import check_run_folder, check_video_columns
    from cachepolicy.validation import INT64_MAX, check_batch_memory, check_int

    check_video_columns(video_columns)  # before anything runs or is written
    check_int(batch, "batch (samples)", low=1)
    check_int(seed, f"seed (a batch of {batch} runs seeds seed..seed+{batch - 1}, each at most 2**63 - 1)", low=0,
              high=INT64_MAX - batch + 1)
    check_run_folder(out, force)
    if isinstance(policies, str):
        policies = [policies]
    built: list[Policy] = []
    texts = [p for p in policies if isinstance(p, str)]
    if texts:
        built.extend(build_policies(*texts))
    built.extend(p for p in policies if isinstance(p, Policy))
    chosen = get_recipe(recipe) if recipe is not None else None
    built = _with_recipe_policies(chosen, built)
    model_name = model if isinstance(model, str) else model.info.name
    adapter = load_model(model, **(model_options or {})) if isinstance(model, str) else model
    prompts = list(prompts) if prompts else [adapter.default_prompt]
    if len(prompts) not in (1, batch):
        raise CachePolicyError(f"{len(prompts)} prompts for a batch of {batch}: give one prompt or one per sample")
    check_batch_memory(adapter.info, batch)
    if len(prompts) == 1:
        prompts = prompts * batch
    seeds = [seed + b for b in range(batch)]
    config = RolloutConfig(num_chunks=num_chunks, prompts=tuple(prompts), seeds=tuple(seeds), recipe=chosen,
                           prompt_switches=tuple(prompt_switches), trace_residency=trace_residency, noise=noise)
    session = Session(adapter, built, config, progress=progress)
    session.check()  # fail before anything is written
    info = adapter.info
    run: dict[str, Any] = {
        "model": model_name,
        "model_options": model_options or {},
        "model_info": info.to_json(),
        "weights": adapter.weights_id(),
        "policies": [{"name": p.name, "spec": p.spec, "params": p.params()} for p in built],
        "policy_spec": "+".join(p.spec for p in built) or "(none)",
        "seed": seed,
        "seeds": seeds,
        "prompts": prompts,
        "num_chunks": num_chunks,
        "tokens_per_frame": info.tokens_per_frame,
        "frames_per_chunk": info.frames_per_chunk,
        "sampler": session.sampler.to_json(),
        "recipe": None if chosen is None else chosen.to_json(),
        "noise": "seeded" if noise is None else repr(noise),
        "prompt_switches": [{"chunk": s.chunk, "prompts": list(s.prompts), "cut": s.cut}
                            for s in prompt_switches],
        "versions": _versions(),
        "package_version": _versions()["cachepolicy"],
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with FolderLock(out, "cachepolicy run"):
        recover_leftovers(out)
        folder = check_run_folder(out, force, locked=True)  # again: another process may have written it meanwhile
        replacing = folder.is_dir() and any(not name.startswith(".") for name in os.listdir(folder))
        stage = new_staging(folder) if replacing else folder
        stage.mkdir(parents=True, exist_ok=True)

        def finish() -> None:  # the run, finished or stopped, takes the place of the one it replaces
            if replacing:
                swap_in(stage, folder)

        videos = _write_run(session, adapter, stage, run, video_columns, finish)
    return {"dir": folder, "run": folder / RUN_FILE, "trace": folder / TRACE_FILE,
            "latents": folder / LATENTS_FILE, "videos": [folder / p.name for p in videos]}


def _write_run(session: Session, adapter: ModelAdapter, folder: Path, run: dict[str, Any],
               video_columns: int | None, finish: Callable[[], None]) -> list[Path]:
    """Run ``session`` into ``folder``: ``run.json`` first, the trace as chunks finish, then the latents
    and videos; on any exception (stops included) the chunks so far, then the exception again. ``finish``
    is called once what there is to save is saved."""
    from cachepolicy.errors import PolicyHookError

    atomic_write_json(folder / RUN_FILE, run)
    writer = TraceWriter(folder / TRACE_FILE)
    total = session.config.num_chunks

    def on_chunk(record: dict[str, Any]) -> None:
        writer(record)
        progress_logger.info("chunk %d of %d done in %.2f s", record["chunk"] + 1, total, record["seconds"])

    session.on_chunk = on_chunk
    try:
        try:
            result = session.run()
        finally:
            writer.close()
        save_latents(folder / LATENTS_FILE, result.latents,
                     metadata={"frames_per_chunk": str(adapter.info.frames_per_chunk), "model": run["model"]})
        videos = _write_videos(adapter, result.latents, folder, video_columns)
    except BaseException as exc:
        # the chunks that finished: the trace and latents as the session holds them (a stop may have landed
        # between a chunk's latents and its trace line, or before the line reached the file)
        partial = session.result()
        trace = partial.trace
        latents = partial.latents[:, :, :len(trace) * adapter.info.frames_per_chunk]
        stopped = isinstance(exc, KeyboardInterrupt)
        run.update(status="interrupted" if stopped else "failed", error=f"{type(exc).__name__}: {exc}",
                   chunks_completed=len(trace))
        if isinstance(exc, PolicyHookError):
            run.update(failed_policy=exc.policy, failed_hook=exc.hook, failed_distribution=exc.distribution)
        _write_trace(folder, trace)
        save_latents(folder / LATENTS_FILE, latents,
                     metadata={"frames_per_chunk": str(adapter.info.frames_per_chunk), "model": run["model"]})
        atomic_write_json(folder / RUN_FILE, run)
        finish()
        raise
    run.update(status="completed", chunks_completed=len(result.trace),
               seconds=sum(r["seconds"] for r in result.trace), videos=[p.name for p in videos])
    _write_trace(folder, result.trace)
    atomic_write_json(folder / RUN_FILE, run)
    finish()
    return videos
