"""What is checked before any job runs: names and specs (:func:`validate`), then each model loaded
(:func:`check_model`); and which metrics a comparison computes by default (:func:`default_metrics`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cachepolicy.compare.config import CompareConfig, _to_models
from cachepolicy.compare.loading import load_model_cached
from cachepolicy.compare.parsing import MAX_JOBS
from cachepolicy.errors import CachePolicyError, CompareConfigError
from cachepolicy.validation import check_int

logger = logging.getLogger(__name__)


def validate(config: CompareConfig) -> None:
    """Check everything that needs no loaded model, before anything is written: each model name and its
    loader's options, each policy spec (named by position; the same policy twice is refused), the
    baseline, the grid's size and seeds, each metric."""
    from cachepolicy.api import build_policies
    from cachepolicy.registry import get_registry

    registry = get_registry()
    try:
        check_int(config.num_chunks, "--chunks", low=1)
    except CachePolicyError as exc:
        raise CompareConfigError(str(exc)) from None
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
    resolved: dict[str, int] = {}
    for index, spec in enumerate(config.policies, start=1):
        try:
            policies = build_policies(*recipe_specs(config.recipe, spec))
        except CachePolicyError as exc:
            raise CompareConfigError(
                f"policy spec {index} of {len(config.policies)} ({spec!r}): {exc}"
            ) from exc
        canonical = "+".join(sorted(p.spec for p in policies))
        if canonical in resolved:
            first = resolved[canonical]
            raise CompareConfigError(
                f"policy spec {index} of {len(config.policies)} ({spec!r}) is the same policy as spec {first} "
                f"({config.policies[first - 1]!r}); list each policy once"
            )
        resolved[canonical] = index
    if config.baseline is not None:
        baseline_policy(config)
    jobs = len(config.models) * len(config.policies) * len(config.prompts) * len(config.seeds)
    if jobs > MAX_JOBS:
        raise CompareConfigError(f"the grid has {jobs} jobs ({len(config.models)} models x {len(config.policies)} "
                                 f"policies x {len(config.prompts)} prompts x {len(config.seeds)} seeds); a "
                                 f"comparison takes at most {MAX_JOBS}")
    if not config.prompts or not config.seeds:
        raise CompareConfigError("a comparison needs at least one prompt and one seed")
    for seed in config.seeds:
        check_int(seed, "seed", low=0)
    for model in config.models:  # the loader's options, before any model is loaded
        if model in registry.models:
            registry.models[model].check_options(config.model_options)
        elif "wan-diffusers" in registry.models:  # a diffusers folder
            registry.models["wan-diffusers"].check_options({"path": model, **config.model_options})
    for name in config.metrics:
        metric_cls = registry.metric(name)
        metric = metric_cls(config.metric_options.get(name))
        reason = metric.unavailable_reason()
        if reason:
            raise CompareConfigError(f"metric {name!r} was asked for but is unavailable: {reason}")
    unknown_options = set(config.metric_options) - set(config.metrics)
    if unknown_options:
        raise CompareConfigError(f"options given for metrics that are not computed: {sorted(unknown_options)}")


def baseline_policy(config: CompareConfig) -> str:
    """The listed policy spec that ``config.baseline`` names (the spec as listed, or one that resolves to
    the same policies); the first listed when it is None. Raises :class:`CompareConfigError` naming the
    value and the listed specs when it names none of them."""
    if config.baseline is None:
        return config.policies[0]
    if config.baseline in config.policies:
        return config.baseline
    from cachepolicy.api import build_policies

    def canonical(spec: str) -> str | None:
        try:
            return "+".join(sorted(p.spec for p in build_policies(*recipe_specs(config.recipe, spec))))
        except CachePolicyError:
            return None

    wanted = canonical(config.baseline)
    for spec in config.policies:
        if wanted is not None and canonical(spec) == wanted:
            return spec
    listed = "; ".join(repr(spec) for spec in config.policies)
    raise CompareConfigError(f"--baseline {config.baseline!r} is none of the compared policies; it must be one "
                             f"of: {listed}")


def recipe_specs(recipe: str | None, spec: str) -> list[str]:
    """The policy specs a job runs: the recipe's (unless the spec names the same policy) and ``spec``."""
    from cachepolicy.recipes import get_recipe, merge_policy_specs

    return merge_policy_specs(get_recipe(recipe) if recipe is not None else None, [spec])


def check_model(config: CompareConfig, load_token: str = "") -> dict[str, str | None]:
    """Load each model and check the rollout length, every prompt and every policy against it; returns each
    model's :meth:`~cachepolicy.models.ModelAdapter.weights_id`.

    The models are checked last to first, so the first model, whose jobs run first, stays loaded for them
    (the process holds one model at a time; ``load_token`` is the comparison's, see :func:`~cachepolicy.compare.loading.load_model_cached`).
    With several models an error names the model.
    """
    from cachepolicy.api import build_policies

    weights: dict[str, str | None] = {}
    for model in reversed(config.models):
        where = f"model {model!r}: " if len(config.models) > 1 else ""
        adapter = load_model_cached(model, config.model_options, load_token)
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
            for policy in build_policies(*recipe_specs(config.recipe, spec)):
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


