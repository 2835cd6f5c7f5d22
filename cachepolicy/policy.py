"""Policies, their parameters, spec strings and composition.

A policy is a frozen :mod:`attrs` class deriving from :class:`Policy`; its attrs fields are its parameters
and its methods implement rollout hooks (:mod:`cachepolicy.hookspecs`). Per-rollout mutable state never
lives on the policy: it lives in ``session.policy_state`` (see :meth:`Policy.state`).

Spec strings select and parameterise policies on the command line and in the Python API::

    attention-sink:frames=3+sliding-window:frames=12+tokentrim:p=0.1

``+`` composes; ``name:key=value,key=value`` sets parameters. Composition is order-independent: each
policy says what it *protects* and what it *drops*; a token is evicted when some policy drops it and no
policy protects it (protect beats drop).
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from cachepolicy.errors import CompositionError, ParameterError, SpecError, UnknownNameError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.engine import Session
    from cachepolicy.models import ModelInfo

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")

#: attrs field-metadata key giving a parameter's name in spec strings when it cannot be the field name,
#: e.g. a Python keyword: ``lam: float = attrs.field(default=2.0, metadata={SPEC_NAME: "lambda"})`` is
#: written ``lambda=2.0`` in specs, listed as ``lambda`` by :meth:`Policy.params` and in error messages,
#: and passed as ``lam=`` in Python.
SPEC_NAME = "spec_name"


def spec_name(attribute: attrs.Attribute) -> str:
    """The name of a policy parameter in spec strings: ``metadata[SPEC_NAME]`` if set, else the field name."""
    return attribute.metadata.get(SPEC_NAME, attribute.name)


class Policy:
    """Base class of cache policies.

    Subclasses set ``name`` (the spec name, e.g. ``"sliding-window"``), are decorated with
    ``@attrs.frozen``, declare parameters as annotated attrs fields with defaults and validators, and
    implement any rollout hooks with ``@hookimpl``.
    """

    name: ClassVar[str] = ""
    #: One line shown by ``cachepolicy plugins``.
    summary: ClassVar[str] = ""

    #: ``"raw"`` if the policy re-rotates resident keys per call (``cachepolicy_rope_positions``), which needs
    #: keys stored before RoPE; None: either cache mode.
    rope_mode: ClassVar[str | None] = None

    #: the values each numeric trace field of ``chunk_end`` can take, ``(low, high)`` with None unbounded
    #: (the compare report clips its bands to them; bool fields are 0 to 1 without saying so)
    trace_ranges: ClassVar[Mapping[str, tuple[float | None, float | None]]] = {}

    def check_compatible(self, model: ModelInfo) -> None:
        """Raise :class:`~cachepolicy.errors.ParameterError` if this policy cannot run on ``model``.

        Called once before a rollout starts, so bad settings fail before any work is done.
        """

    def cache_bound(self, model: ModelInfo) -> CacheBound | None:
        """What this policy bounds about the cache, for sizing buffers before the rollout (None: nothing).

        A bound only sizes the first allocation; a cache that outgrows it still grows, so a wrong bound costs
        memory or a reallocation, never correctness.
        """
        return None

    def new_state(self) -> Any:
        """Return this policy's fresh per-rollout state (``None`` for stateless policies)."""
        return None

    def state(self, session: Session) -> Any:
        """This policy's per-rollout state, created by :meth:`new_state` at session start."""
        return session.policy_state[self.spec]

    @classmethod
    def parameters(cls) -> dict[str, attrs.Attribute]:
        """The policy's parameters by spec name (its attrs fields; see :func:`spec_name`)."""
        if not attrs.has(cls):
            return {}
        return {spec_name(a): a for a in attrs.fields(cls)}

    def params(self) -> dict[str, Any]:
        """Parameter values of this instance by spec name, JSON-serialisable."""
        return {name: getattr(self, a.name) for name, a in self.parameters().items()}

    @property
    def spec(self) -> str:
        """Canonical spec string with every parameter, e.g. ``sliding-window:frames=12``."""
        params = self.params()
        if not params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in params.items())

    def __str__(self) -> str:
        return self.spec


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@attrs.frozen
class CacheBound:
    """What a policy bounds about the resident cache (latent frames).

    Attributes:
        kept_frames: the policy drops every context token outside at most this many frames (a window), or
            None (it bounds nothing).
        protected_frames: frames the policy protects from every other policy's drops (a sink).
    """

    kept_frames: int | None = None
    protected_frames: int = 0


def cache_bound_frames(policies: Iterable[Policy], model: ModelInfo, num_frames: int) -> int:
    """The most context frames a composition can hold: the tightest window plus every protected frame, at
    most ``num_frames`` (the rollout's length: without a window, everything)."""
    bounds = [bound for bound in (p.cache_bound(model) for p in policies) if bound is not None]
    windows = [bound.kept_frames for bound in bounds if bound.kept_frames is not None]
    if not windows:
        return num_frames
    return min(num_frames, min(windows) + sum(bound.protected_frames for bound in bounds))


# --------------------------------------------------------------------------------------------------
# Decisions returned by hooks
# --------------------------------------------------------------------------------------------------


def _bool_mask(name: str, shapes: str = "[B, S], [L, B, S] or [L, H, B, S]", ndims: tuple[int, ...] = (2, 3, 4)):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        import torch

        if value is None:
            return
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.ndim not in ndims:
            got = getattr(value, "dtype", type(value).__name__), tuple(getattr(value, "shape", ()))
            raise ParameterError(f"{name} must be a bool tensor of shape {shapes}, got {got}")

    return check


@attrs.frozen(eq=False)
class Selection:
    """What one policy decides about the resident tokens at ``select``.

    Masks cover the :class:`~cachepolicy.cache.CacheView` tokens ``[B, S]``, for every layer and head, or
    per layer ``[L, B, S]``, or per layer and head ``[L, H, B, S]`` (a token can stay in some layers or heads
    and leave others). Protect beats drop in each (layer, head).

    Attributes:
        protect: bool mask of tokens that must be kept, or None.
        drop: bool mask of tokens this policy would evict, or None.
    """

    protect: torch.Tensor | None = attrs.field(default=None, validator=_bool_mask("Selection.protect"))
    drop: torch.Tensor | None = attrs.field(default=None, validator=_bool_mask("Selection.drop"))


@attrs.frozen(eq=False)
class PruneRequest:
    """Ask the engine to hard-prune resident tokens and regenerate the current chunk.

    Attributes:
        drop: bool ``[B, S]`` over the resident cache (the view the hook received). Tokens that any policy
            protects are kept regardless.
        samples: bool ``[B]``: the samples whose chunk is regenerated. Samples not listed keep their
            current result and their cache is left untouched.
        max_restarts: the most restarts of one chunk that the requesting policy allows (per sample);
            requests beyond it are ignored and the sample's candidate is accepted as is.
        reason: a short human-readable reason, logged.
    """

    drop: torch.Tensor = attrs.field(validator=_bool_mask("PruneRequest.drop", "[B, S]", (2,)))
    samples: torch.Tensor = attrs.field()
    max_restarts: int = attrs.field(default=1)
    reason: str = ""

    @samples.validator
    def _check_samples(self, attribute: attrs.Attribute, value: Any) -> None:
        import torch

        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.ndim != 1:
            raise ParameterError("PruneRequest.samples must be a bool tensor of shape [B]")
        if value.shape[0] != self.drop.shape[0]:
            raise ParameterError(
                f"PruneRequest.samples has {value.shape[0]} entries but drop covers {self.drop.shape[0]} samples"
            )

    @max_restarts.validator
    def _check_max(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ParameterError(f"PruneRequest.max_restarts must be an int >= 0, got {value!r}")


@attrs.frozen(eq=False)
class Resolution:
    """The composed decision of all policies for one chunk.

    Attributes:
        keep: bool ``[B, S]`` (every selection was per token) or ``[L, H, B, S]``: resident tokens that
            survive, per layer and head (frame order is preserved by compaction).
        protected: bool ``[B, S]``: tokens some policy protected in some layer (they become ``pinned``).
        dropped_by: tokens evicted, per policy spec (a token two policies drop counts for both). A token
            evicted from only some layers or heads counts as the fraction of layer-heads it left.
        evicted: total tokens evicted over the batch (same units).
    """

    keep: torch.Tensor
    protected: torch.Tensor
    dropped_by: dict[str, int | float]
    evicted: int | float


def compose(selections: Mapping[str, Selection | None], valid: torch.Tensor, num_layers: int = 1,
            num_heads: int = 1) -> Resolution:
    """Compose per-policy selections into one keep set; the result does not depend on their order.

    Args:
        selections: per policy spec, its :class:`Selection` (or None for "no opinion").
        valid: bool ``[B, S]``: which view positions hold a resident token.
        num_layers: the model's layers, for selections per layer (``[L, B, S]``).
        num_heads: the model's heads, for selections per layer and head (``[L, H, B, S]``).
    """
    import torch

    masks = [m for sel in selections.values() if sel is not None for m in (sel.protect, sel.drop) if m is not None]
    for mask in masks:
        if mask.shape[-2:] != valid.shape or (mask.ndim >= 3 and mask.shape[0] != num_layers) or (
                mask.ndim == 4 and mask.shape[1] != num_heads):
            raise CompositionError(
                f"a selection mask has shape {tuple(mask.shape)}; the cache view is {tuple(valid.shape)} "
                f"([B, S]), with {num_layers} layers and {num_heads} heads for [L, B, S] or [L, H, B, S]"
            )
    granular = any(mask.ndim > 2 for mask in masks)

    def full(mask: torch.Tensor) -> torch.Tensor:
        if not granular:
            return mask
        if mask.ndim == 2:
            return mask[None, None]
        return mask[:, None] if mask.ndim == 3 else mask

    shape = (num_layers, num_heads, *valid.shape) if granular else valid.shape
    protect = torch.zeros(shape, dtype=torch.bool, device=valid.device)
    drop = torch.zeros(shape, dtype=torch.bool, device=valid.device)
    for sel in selections.values():
        if sel is None:
            continue
        if sel.protect is not None:
            protect |= full(sel.protect)
        if sel.drop is not None:
            drop |= full(sel.drop)
    evict = drop & ~protect & valid
    keep = valid & ~evict
    cells = num_layers * num_heads if granular else 1

    def count(mask: torch.Tensor) -> int | float:
        total = int(mask.sum())
        return total if cells == 1 else round(total / cells, 3)

    dropped_by = {}
    for spec in sorted(selections):
        sel = selections[spec]
        if sel is not None and sel.drop is not None:
            dropped_by[spec] = count(full(sel.drop) & evict)
    protected = (protect.flatten(0, 1).any(dim=0) if granular else protect) & valid
    return Resolution(keep=keep, protected=protected, dropped_by=dropped_by, evicted=count(evict))


# --------------------------------------------------------------------------------------------------
# Parameter validators (raise the project's own errors)
# --------------------------------------------------------------------------------------------------


def positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: an int > 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ParameterError(
            f"{type(instance).name}: {spec_name(attribute)}={value!r} is not allowed; it must be a positive integer"
        )


def non_negative_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """attrs validator: an int >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ParameterError(
            f"{type(instance).name}: {spec_name(attribute)}={value!r} is not allowed; it must be an integer >= 0"
        )


def finite_float(low: float | None = None, high: float | None = None, *, open_low: bool = False,
                 open_high: bool = False):
    """attrs validator factory: a finite float within the given bounds."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and low is not None:
            ok = value > low if open_low else value >= low
        if ok and high is not None:
            ok = value < high if open_high else value <= high
        if not ok:
            lo = "" if low is None else f"{'(' if open_low else '['}{low}"
            hi = "" if high is None else f"{high}{')' if open_high else ']'}"
            allowed = f"a finite number in {lo or '(-inf'}, {hi or 'inf)'}"
            raise ParameterError(
                f"{type(instance).name}: {spec_name(attribute)}={value!r} is not allowed; it must be {allowed}"
            )

    return check


# --------------------------------------------------------------------------------------------------
# Spec strings
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class PolicySpec:
    """One parsed ``name:key=value,...`` term (values still strings)."""

    name: str
    params: tuple[tuple[str, str], ...]
    text: str


def parse_spec(text: str) -> list[PolicySpec]:
    """Split a spec string into its ``+``-joined terms and parse each ``name:key=value,...``.

    Raises:
        SpecError: on an empty term, a bad name, a parameter without ``=``, or a repeated key.
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"empty policy spec {text!r}; expected e.g. 'sliding-window:frames=12'")
    terms: list[PolicySpec] = []
    for raw in text.split("+"):
        term = raw.strip()
        if not term:
            raise SpecError(f"policy spec {text!r} has an empty term around '+'")
        name, _, rest = term.partition(":")
        name = name.strip()
        if not _NAME_RE.match(name):
            raise SpecError(
                f"bad policy name {name!r} in spec {text!r}: names are lower-case letters, digits, '-' and '_'"
            )
        params: list[tuple[str, str]] = []
        if _:
            if not rest.strip():
                raise SpecError(f"policy term {term!r} has ':' but no parameters; write {name!r} alone")
            seen: set[str] = set()
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key, value = key.strip(), value.strip()
                if not eq or not key or not value:
                    raise SpecError(
                        f"malformed parameter {item.strip()!r} in policy term {term!r}; expected key=value"
                    )
                if key in seen:
                    raise SpecError(f"parameter {key!r} given twice in policy term {term!r}")
                seen.add(key)
                params.append((key, value))
        terms.append(PolicySpec(name=name, params=tuple(params), text=term))
    return terms


def _convert(policy_name: str, key: str, raw: str, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if raw == str(choice):
                return choice
        raise ParameterError(
            f"{policy_name}: {key}={raw!r} is not allowed; choose one of {', '.join(map(str, choices))}"
        )
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ParameterError(f"{policy_name}: {key}={raw!r} is not a boolean (use true or false)")
    if annotation is int:
        try:
            return int(raw, 10)
        except ValueError:
            raise ParameterError(f"{policy_name}: {key}={raw!r} is not an integer") from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise ParameterError(f"{policy_name}: {key}={raw!r} is not a number") from None
        return value
    if annotation is str:
        return raw
    raise ParameterError(f"{policy_name}: parameter {key!r} has an unsupported type {annotation!r}")


def instantiate(policy_cls: type[Policy], spec: PolicySpec) -> Policy:
    """Build a policy from a parsed spec term, converting and validating every parameter."""
    fields = policy_cls.parameters()  # by spec name
    hints = typing.get_type_hints(policy_cls)
    kwargs: dict[str, Any] = {}
    for key, raw in spec.params:
        if key not in fields:
            allowed = ", ".join(f"{n} ({_type_name(hints.get(a.name))})" for n, a in fields.items()) or "none"
            raise ParameterError(
                f"policy {policy_cls.name!r} has no parameter {key!r}; its parameters are: {allowed}"
            )
        attribute = fields[key]
        kwargs[attribute.alias or attribute.name] = _convert(policy_cls.name, key, raw, hints[attribute.name])
    try:
        return policy_cls(**kwargs)
    except TypeError as exc:  # a required parameter was not given
        missing = [n for n, a in fields.items()
                   if a.default is attrs.NOTHING and (a.alias or a.name) not in kwargs]
        if missing:
            raise ParameterError(
                f"policy {policy_cls.name!r} needs parameter(s) {', '.join(missing)} (e.g. "
                f"'{policy_cls.name}:{missing[0]}=...')"
            ) from exc
        raise


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "|".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def build_policies(specs: str | Sequence[str], available: Mapping[str, type[Policy]]) -> list[Policy]:
    """Parse spec strings and instantiate their policies from ``available`` (name -> class).

    Several strings compose like ``+``. Errors name the term that failed.

    Raises:
        SpecError: a malformed spec string.
        UnknownNameError: a policy name nothing provides (with the closest names).
        ParameterError: an unknown, mistyped or out-of-range parameter.
        CompositionError: the same policy composed twice.
    """
    if isinstance(specs, str):
        specs = [specs]
    policies: list[Policy] = []
    for text in specs:
        for term in parse_spec(text):
            if term.name not in available:
                raise UnknownNameError("policy", term.name, available)
            policies.append(instantiate(available[term.name], term))
    check_unique(policies)
    return policies


def check_unique(policies: Iterable[Policy]) -> None:
    """Reject a composition that lists the same policy class twice."""
    seen: dict[str, Policy] = {}
    for policy in policies:
        if policy.name in seen:
            raise CompositionError(
                f"policy {policy.name!r} appears twice ({seen[policy.name].spec} and {policy.spec}); "
                f"compose each policy at most once"
            )
        seen[policy.name] = policy


def hook_names(obj: Any) -> list[str]:
    """Names of the ``cachepolicy_*`` hooks that a policy class or plugin module implements."""
    from cachepolicy.hookspecs import PROJECT_NAME

    names = []
    for attr in dir(obj):
        if attr.startswith("cachepolicy_"):
            member = getattr(obj, attr, None)
            if member is not None and hasattr(member, PROJECT_NAME + "_impl"):
                names.append(attr)
    return sorted(names)
