"""A comparison's grid: :class:`Job` (one cell) and :class:`CompareConfig` (the grid and its fingerprint)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs


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
    composed with each policy spec (see docs "Recipes"). ``baseline`` (one of ``policies``; None: the first)
    is the policy the report pairs every other one with; it changes no result, so it is not part of the
    fingerprint.
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
    baseline: str | None = None

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
            **({"baseline": self.baseline} if self.baseline is not None else {}),
        }

    @property
    def fingerprint(self) -> str:
        """Of everything that changes the results (the baseline aside)."""
        data = {k: v for k, v in self.to_json().items() if k != "baseline"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def jobs(self) -> list[Job]:
        """The grid, model by model (the jobs of one model run together: a process holds one model)."""
        return [Job(model, policy, prompt, seed) for model in self.models for policy in self.policies
                for prompt in self.prompts for seed in self.seeds]


