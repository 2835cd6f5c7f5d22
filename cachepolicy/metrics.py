"""Metrics for ``cachepolicy compare``: the contract, and the data one job hands to every metric.

Metrics are plugins: an entry-point module implements ``cachepolicy_metrics()`` returning
:class:`Metric` subclasses (the built-ins do so from ``cachepolicy.plugins.metrics``). A metric computes
one scalar per job and, optionally, one value per chunk (a curve that the report plots against the chunk
index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from cachepolicy.errors import ParameterError

if TYPE_CHECKING:  # pragma: no cover
    import torch


@attrs.frozen(eq=False)
class JobData:
    """Everything a metric may read about one finished job (one prompt, one seed, one policy).

    Attributes:
        latents: ``[C, T, H, W]`` float32 committed latents of the job (``T`` latent frames).
        frames: ``[T', 3, H', W']`` decoded pixels in [0, 1] when the model has a decoder, else None.
        trace: the per-chunk trace records (see ``trace.jsonl``).
        frames_per_chunk: latent frames per chunk.
        token_grid: maps ``[B, C, F, H, W]`` latents to ``[B, F, N, D]`` tokens, or None.
        prompt, seed, policy: the job's coordinates (``policy`` is the spec as given).
        ground_truth: model-specific ground truth of the scene (the drift lab provides it), or None.
    """

    latents: torch.Tensor
    frames: torch.Tensor | None
    trace: list[dict[str, Any]]
    frames_per_chunk: int
    token_grid: Callable[[torch.Tensor], torch.Tensor] | None
    prompt: str
    seed: int
    policy: str
    ground_truth: Any = None

    @property
    def num_chunks(self) -> int:
        return len(self.trace)


@attrs.frozen
class MetricValue:
    """One job's result: a scalar, and optionally one value per chunk (a curve)."""

    value: float
    per_chunk: tuple[float, ...] | None = attrs.field(
        default=None, converter=lambda v: None if v is None else tuple(float(x) for x in v))


class Metric:
    """Base class of compare metrics.

    Subclasses set ``name`` and ``summary``, may set ``unit``, ``higher_is_better`` (None: neither),
    ``value_range`` (the values the metric can take, per chunk and per job: the report clips its bands to
    it), ``for_policies`` and ``deterministic`` (False for wall-clock timings, which the reproducibility
    check skips), and implement :meth:`compute`. A metric that needs something the user may not have
    (weights on a local path) overrides :meth:`unavailable_reason`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    unit: ClassVar[str] = ""
    higher_is_better: ClassVar[bool | None] = None
    #: ``(low, high)``, None for unbounded
    value_range: ClassVar[tuple[float | None, float | None]] = (None, None)
    #: names of the policies whose trace the metric reads: the report shows it only for the compared
    #: policies that include one of them (empty: every policy)
    for_policies: ClassVar[tuple[str, ...]] = ()
    deterministic: ClassVar[bool] = True
    #: True for metrics that compare with the scene's ground truth: only models whose entry
    #: ``provides_ground_truth`` include them by default.
    needs_ground_truth: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        allowed = set(self.option_names())
        unknown = set(self.options) - allowed
        if unknown:
            raise ParameterError(
                f"metric {self.name!r} has no option(s) {sorted(unknown)}; allowed: {sorted(allowed) or 'none'}"
            )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Options a user may set with ``--metric-option NAME.KEY=VALUE``."""
        return ()

    def unavailable_reason(self) -> str | None:
        """None when the metric can run, else why not (e.g. no local weights were given)."""
        return None

    def compute(self, job: JobData) -> MetricValue:  # pragma: no cover - abstract
        raise NotImplementedError


def chunk_slices(job: JobData) -> list[slice]:
    """Latent-frame slices of each chunk of the job."""
    f = job.frames_per_chunk
    return [slice(c * f, (c + 1) * f) for c in range(job.latents.shape[1] // f)]


def _number(value: Any) -> float | None:
    """A trace value as a number: bools count 0/1, None and non-finite numbers are None; raises
    ``TypeError`` for anything else."""
    if value is None:
        return None
    if isinstance(value, (bool, int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(type(value).__name__)


def _chunk_number(value: Any) -> float | None:
    """One chunk's value of a trace field: a number, or a per-sample list of numbers (their mean)."""
    if isinstance(value, list):
        numbers = [n for n in map(_number, value) if n is not None]
        return math.fsum(numbers) / len(numbers) if numbers else None
    return _number(value)


def policy_trace_fields(trace: Sequence[Mapping[str, Any]], sources: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The numeric trace fields that policies returned from ``chunk_end``, summarised like metrics.

    ``sources`` maps each such field to its policy (a :class:`~cachepolicy.policy.Policy`, or its name). A
    field is numeric when each chunk's value is a number, a bool (0/1), None, or a list of those (one per
    sample: their mean). Returns ``{"<policy>.<field>": {"value": mean over chunks, "per_chunk": [...],
    "range": [low, high]}}`` (the range as the policy's ``trace_ranges`` declares it, 0 to 1 for bools,
    else unbounded); other fields are left out.
    """
    fields: dict[str, dict[str, Any]] = {}
    for field, policy in sources.items():
        values = [record.get(field) for record in trace]
        try:
            curve = [_chunk_number(value) for value in values]
        except TypeError:
            continue
        numbers = [v for v in curve if v is not None]
        if not numbers:
            continue
        flat = [x for v in values for x in (v if isinstance(v, list) else [v]) if x is not None]
        declared = getattr(policy, "trace_ranges", {}).get(field)
        value_range = declared or ((0.0, 1.0) if all(isinstance(x, bool) for x in flat) else (None, None))
        name = policy if isinstance(policy, str) else policy.name
        fields[f"{name}.{field}"] = {"value": math.fsum(numbers) / len(numbers), "per_chunk": curve,
                                     "range": list(value_range)}
    return fields
