"""``cachepolicy compare``: a grid of models x policies x prompts x seeds, resumable, with a report.

Layout of the output folder::

    DIR/config.json        the configuration and its fingerprint (a rerun must match it)
    DIR/results.jsonl      one line per finished job: model, policy (spec as given), prompt, seed, metrics, curves
    DIR/jobs/<id>/         latents.safetensors, trace.jsonl, preview.npy (uint8 frames for the videos)
    DIR/summary.json, summary.md, report.html, plots/, videos/   (see :mod:`cachepolicy.report`)

Each job appends its line only after its artifacts are written, with one ``write`` of the whole line to a
file opened for appending, then ``fsync``. When the results are read back a trailing partial line (a crash
in the middle of a write) is ignored, and it is cut off before the next append, so a killed run resumes:
a rerun with the same configuration skips the finished jobs and every job appears exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from cachepolicy.errors import CachePolicyError, CompareConfigError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"


# ------------------------------------------------------------------------------------------ parsing
def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-7"``, ``"0,3,5"`` or ``"0-3,8"`` -> seeds, in order, without repeats."""
    seeds: list[int] = []
    if not isinstance(text, str) or not text.strip():
        raise CompareConfigError(f"no seeds in {text!r}; write e.g. '0-7' or '0,3,5'")
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise CompareConfigError(f"cannot parse seeds {text!r} at {part!r}; write e.g. '0-7' or '0,3,5'")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise CompareConfigError(f"seed range {part!r} runs backwards; write {high}-{low}")
        seeds.extend(s for s in range(low, high + 1) if s not in seeds)
    return tuple(seeds)


def read_prompts(text: str) -> tuple[str, ...]:
    """A prompts file (one per line, ``#`` comments) if ``text`` names one, else ``;``-separated prompts.

    Text that looks like a path (ends in ``.txt``/``.jsonl``/``.csv`` or contains a path separator) must be
    an existing, non-empty file.
    """
    if not isinstance(text, str) or not text.strip():
        raise CompareConfigError("no prompts given; pass a prompts file or 'prompt one; prompt two'")
    path = Path(text)
    looks_like_path = text.endswith((".txt", ".jsonl", ".csv")) or os.sep in text
    if path.is_file():
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
        if not prompts:
            raise CompareConfigError(f"prompts file {path} holds no prompt (one per line; '#' starts a comment)")
        return tuple(dict.fromkeys(prompts))
    if looks_like_path:
        raise CompareConfigError(f"prompts file {text} does not exist")
    prompts = [p.strip() for p in text.split(";") if p.strip()]
    if not prompts:
        raise CompareConfigError(f"no prompts in {text!r}")
    return tuple(dict.fromkeys(prompts))


def split_policies(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"SPEC; SPEC; ..."`` -> one composed spec per compared policy."""
    parts = [text] if isinstance(text, str) else list(text)
    specs = [s.strip() for part in parts for s in part.split(";") if s.strip()]
    if not specs:
        raise CompareConfigError("no policies to compare; write e.g. --policies 'full; sliding-window:frames=12'")
    return tuple(specs)


# ------------------------------------------------------------------------------------------- config
@attrs.frozen
class Job:
    """One cell of the grid: one model, one composed policy spec, one prompt, one seed."""

    model: str
    policy: str
    prompt: str
    seed: int

    @property
    def id(self) -> str:
        key = json.dumps([self.model, self.policy, self.prompt, self.seed]).encode()
        return hashlib.sha256(key).hexdigest()[:16]


def _to_models(value: str | Sequence[str]) -> tuple[str, ...]:
    """One model name (or folder) or several -> a tuple without repeats, in order."""
    names = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    return tuple(dict.fromkeys(str(name) for name in names))


@attrs.frozen(hash=False, init=False)
class CompareConfig:
    """A comparison: what changes its fingerprint changes the results, and a rerun must match it.

    ``models`` holds one or more model names (or diffusers folders); ``model="x"`` is accepted for
    ``models=("x",)``. ``model_options`` apply to every model. ``recipe`` (a name from
    :data:`cachepolicy.recipes.RECIPES`, or None) runs every job under that system's loop, its policies
    composed with each policy spec (see docs "Recipes").
    """

    models: tuple[str, ...] = attrs.field(converter=_to_models)
    policies: tuple[str, ...] = attrs.field(converter=tuple)
    prompts: tuple[str, ...] = attrs.field(converter=tuple)
    seeds: tuple[int, ...] = attrs.field(converter=tuple)
    num_chunks: int
    metrics: tuple[str, ...] = attrs.field(converter=tuple)
    model_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    metric_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, converter=dict)
    recipe: str | None = None

    def __init__(self, models: str | Sequence[str] | None = None, *, model: str | None = None,
                 **fields: Any) -> None:
        if (models is None) == (model is None):
            raise TypeError("CompareConfig takes models=(...) or model='...', exactly one of them")
        self.__attrs_init__(models=models if model is None else model, **fields)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CompareConfig:
        """The configuration of a ``config.json``; one written before several models (``"model"``) reads
        as ``models=(model,)``."""
        return cls(**dict(data))

    def to_json(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "model_options": dict(sorted(self.model_options.items())),
            "policies": list(self.policies),
            "prompts": list(self.prompts),
            "seeds": list(self.seeds),
            "num_chunks": self.num_chunks,
            "metrics": list(self.metrics),
            "metric_options": {k: dict(v) for k, v in sorted(self.metric_options.items())},
            # only when set, so configurations without a recipe keep their fingerprint
            **({"recipe": self.recipe} if self.recipe is not None else {}),
        }

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def jobs(self) -> list[Job]:
        """The grid, model by model (the jobs of one model run together: a process holds one model)."""
        return [Job(model, policy, prompt, seed) for model in self.models for policy in self.policies
                for prompt in self.prompts for seed in self.seeds]


def validate(config: CompareConfig) -> None:
    """Check every name before any job runs: each model, each policy spec (named by position), each metric."""
    from cachepolicy.api import build_policies
    from cachepolicy.registry import get_registry

    registry = get_registry()
    if config.num_chunks < 1:
        raise CompareConfigError(f"--chunks must be at least 1, got {config.num_chunks}")
    if not config.models:
        raise CompareConfigError("no models to compare; name one or more, e.g. 'tiny-wan tiny-skyreels'")
    for model in config.models:
        if model not in registry.models and not Path(model).is_dir():
            registry.model(model)  # raises UnknownNameError with suggestions
    if config.recipe is not None:
        from cachepolicy.recipes import get_recipe

        try:
            get_recipe(config.recipe)
        except CachePolicyError as exc:
            raise CompareConfigError(f"--recipe: {exc}") from exc
    for index, spec in enumerate(config.policies, start=1):
        try:
            build_policies(*_recipe_specs(config.recipe, spec))
        except CachePolicyError as exc:
            raise CompareConfigError(
                f"policy spec {index} of {len(config.policies)} ({spec!r}): {exc}"
            ) from exc
    for name in config.metrics:
        metric_cls = registry.metric(name)
        metric = metric_cls(config.metric_options.get(name))
        reason = metric.unavailable_reason()
        if reason:
            raise CompareConfigError(f"metric {name!r} was asked for but is unavailable: {reason}")
    unknown_options = set(config.metric_options) - set(config.metrics)
    if unknown_options:
        raise CompareConfigError(f"options given for metrics that are not computed: {sorted(unknown_options)}")


def _recipe_specs(recipe: str | None, spec: str) -> list[str]:
    """The policy specs a job runs: the recipe's (unless the spec names the same policy) and ``spec``."""
    from cachepolicy.recipes import get_recipe, merge_policy_specs

    return merge_policy_specs(get_recipe(recipe) if recipe is not None else None, [spec])


def check_model(config: CompareConfig, load_token: str = "") -> dict[str, str | None]:
    """Load each model and check the rollout length, every prompt and every policy against it; returns each
    model's :meth:`~cachepolicy.models.ModelAdapter.weights_id`.

    The models are checked last to first, so the first model, whose jobs run first, stays loaded for them
    (the process holds one model at a time; ``load_token`` is the comparison's, see :func:`_load_model_cached`).
    With several models an error names the model.
    """
    from cachepolicy.api import build_policies

    weights: dict[str, str | None] = {}
    for model in reversed(config.models):
        where = f"model {model!r}: " if len(config.models) > 1 else ""
        adapter = _load_model_cached(model, config.model_options, load_token)
        weights[model] = adapter.weights_id()
        try:  # every prompt once, so one the model refuses fails before any job
            adapter.encode_prompts(list(config.prompts))
        except CachePolicyError as exc:
            if not where:
                raise
            raise CompareConfigError(f"{where}{exc}") from exc
        try:
            adapter.check_rollout(config.num_chunks * adapter.info.frames_per_chunk, 1)
        except CachePolicyError as exc:
            if not where:
                raise
            raise CompareConfigError(f"{where}{exc}") from exc
        for index, spec in enumerate(config.policies, start=1):
            for policy in build_policies(*_recipe_specs(config.recipe, spec)):
                try:
                    policy.check_compatible(adapter.info)
                except CachePolicyError as exc:
                    raise CompareConfigError(
                        f"{where}policy spec {index} of {len(config.policies)} ({spec!r}): {exc}"
                    ) from exc
    return weights


def default_metrics(metric_options: Mapping[str, Mapping[str, Any]] | None = None,
                    models: str | Sequence[str] | None = None, *, model: str | None = None) -> tuple[str, ...]:
    """Every installed metric that is available for every one of ``models`` (or ``model``): one that needs
    weights the user lacks is skipped, and ground-truth metrics only apply when every model's entry
    ``provides_ground_truth``."""
    from cachepolicy.registry import get_registry

    registry = get_registry()
    names_of = _to_models(models if models is not None else (model if model is not None else ()))
    entries = [registry.models.get(name) for name in names_of]
    has_truth = bool(entries) and all(e is not None and e.provides_ground_truth for e in entries)
    names = []
    for name, cls in registry.metrics.items():
        if getattr(cls, "needs_ground_truth", False) and not has_truth:
            continue
        reason = cls((metric_options or {}).get(name)).unavailable_reason()
        if reason:
            logger.info("metric %s is unavailable: %s", name, reason)
        else:
            names.append(name)
    return tuple(names)


# ----------------------------------------------------------------------------------------- results
class ResultsStore:
    """``results.jsonl``: whole lines only, appended atomically, read back ignoring a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records, seen = [], set()
        data = self.path.read_bytes()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("ignoring a torn line in %s (a run was killed mid-write)", self.path)
                continue
            if record.get("job_id") in seen:
                continue
            seen.add(record.get("job_id"))
            records.append(record)
        return records

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
        line = (json.dumps(record, sort_keys=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # pragma: no cover - regular files write whole small buffers
                raise OSError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ worker
_MODEL_CACHE: dict[str, Any] = {}


def _load_model_cached(model: str, options: Mapping[str, Any], load_token: str) -> Any:
    """The process's loaded model for these options within one comparison (``load_token``, new per
    :func:`run_compare` call): the jobs of a comparison share a load, a later comparison loads anew (the
    weights may have been retrained at the same path since)."""
    from cachepolicy.api import load_model

    key = json.dumps([model, dict(sorted(options.items())), load_token], sort_keys=True)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model per process at a time
        _MODEL_CACHE[key] = load_model(model, **dict(options))
    return _MODEL_CACHE[key]


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
    """Run one job and write its artifacts; returns its results line. Top-level so executors can ship it."""
    import numpy as np

    from cachepolicy.api import build_policies
    from cachepolicy.engine import RolloutConfig, Session
    from cachepolicy.metrics import JobData
    from cachepolicy.outputs import save_latents
    from cachepolicy.registry import get_registry

    job = Job(**payload["job"])
    adapter = _load_model_cached(job.model, payload["model_options"], payload["load_token"])
    recipe_name = payload.get("recipe")
    policies = build_policies(*_recipe_specs(recipe_name, job.policy))
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

    folder = Path(payload["out"]) / "jobs" / job.id
    folder.mkdir(parents=True, exist_ok=True)
    save_latents(folder / "latents.safetensors", result.latents)
    (folder / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.trace))
    latents = result.latents[0].float()
    decoded, preview = preview_frames(adapter, latents)
    np.save(folder / "preview.npy", preview)

    try:
        adapter.token_grid(latents[:, :1].unsqueeze(0))
        token_grid = adapter.token_grid
    except NotImplementedError:
        token_grid = None
    data = JobData(latents=latents, frames=decoded, trace=result.trace,
                   frames_per_chunk=adapter.info.frames_per_chunk, token_grid=token_grid, prompt=job.prompt,
                   seed=job.seed, policy=job.policy,
                   ground_truth=adapter.ground_truth(job.prompt, job.seed, latents.shape[1]))
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
        "metrics": metrics,
        "curves": curves,
        "preview_decoded": decoded is not None,
        "chunks": len(result.trace),
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------ driver
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
