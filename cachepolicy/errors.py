"""The project's exceptions.

Every error raised on bad user input derives from :class:`CachePolicyError`, so callers can catch the
project's errors without catching programming errors. Each subclass also derives from the builtin
exception that best describes it (``ValueError``, ``LookupError``...), so generic handlers keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CachePolicyError(Exception):
    """Base class of every error that ``cachepolicy`` raises on purpose."""


class SpecError(CachePolicyError, ValueError):
    """A policy spec string (``name:key=value,...+name2``) is malformed."""


class UnknownNameError(CachePolicyError, LookupError):
    """A policy, model, adapter or metric name that nothing registered provides."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        close = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(self.known) if self.known else "(none installed)"
        plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
        super().__init__(f"unknown {kind} {name!r}.{hint} Known {plural}: {listing}.")

    def __str__(self) -> str:  # LookupError would repr() the message otherwise
        return str(self.args[0])


class ParameterError(CachePolicyError, ValueError):
    """A parameter has an unknown name, the wrong type, or a value outside what is allowed."""


class CompositionError(CachePolicyError, ValueError):
    """Policies cannot be composed as asked (duplicates, conflicting rewrites)."""


class RolloutConfigError(CachePolicyError, ValueError):
    """A rollout cannot run as configured (too long for the model's RoPE table, bad batch, ...)."""


class CacheShapeError(CachePolicyError, ValueError):
    """A tensor does not match the cache's batch size, heads, head dim or layer count."""


class NonFiniteOutputError(CachePolicyError, FloatingPointError):
    """The model produced NaN or Inf; the rollout stopped at ``chunk``."""

    def __init__(self, chunk: int, detail: str = "") -> None:
        self.chunk = chunk
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"the model produced non-finite values at chunk {chunk}{extra}; "
            f"the rollout stopped and chunks 0..{chunk - 1} were kept"
        )


class PluginLoadError(CachePolicyError, ImportError):
    """A plugin (entry point) could not be imported or registered."""


class CheckpointError(CachePolicyError, ValueError):
    """A weights file does not match the model it is loaded into."""


class CompareConfigError(CachePolicyError, ValueError):
    """A ``compare`` configuration is invalid, or its output folder holds another configuration."""


class MissingDependencyError(CachePolicyError, ImportError):
    """An optional dependency that a requested feature needs is not installed (the message says what to
    ``pip install``)."""


class PolicyHookError(CachePolicyError, RuntimeError):
    """A policy's hook raised an unexpected error (or returned something the engine cannot use).

    Attributes:
        policy: the policy's spec string.
        hook: the hook that failed.
        distribution: the distribution that provides the policy, when known.
    """

    def __init__(self, policy: str, hook: str, distribution: str | None, detail: str) -> None:
        self.policy = policy
        self.hook = hook
        self.distribution = distribution
        origin = f" (from distribution {distribution!r})" if distribution else ""
        super().__init__(f"policy {policy!r}{origin} failed in {hook}: {detail}")


class FolderBusyError(CachePolicyError, RuntimeError):
    """An output folder is being written by another process (its lock names the holder)."""

    def __init__(self, folder: object, holder: dict[str, object]) -> None:
        self.folder = folder
        self.holder = dict(holder)
        who = ", ".join(f"{key} {holder[key]}" for key in ("command", "pid", "host", "started") if holder.get(key))
        super().__init__(
            f"{folder} is being written by another cachepolicy process ({who or 'holder unknown'}); wait for it to "
            f"finish or use another --out"
        )


class DamagedFolderError(CachePolicyError, ValueError):
    """A file of an output folder cannot be read back: ``path`` (and ``line``, 1-based, when the damage is
    in one line of a JSON-lines file) says where."""

    def __init__(self, path: object, problem: str, *, line: int | None = None, hint: str = "") -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"{path} line {line}" if line is not None else f"{path}"
        super().__init__(f"{where} is damaged: {problem}" + (f"; {hint}" if hint else ""))


class StopRequested(KeyboardInterrupt):
    """The process was asked to stop (``SIGINT``, ``SIGTERM`` or ``SIGHUP``); raised where it was running, so
    that what finished is saved on the way out. ``signal_name`` names the signal."""

    def __init__(self, signal_name: str = "SIGINT") -> None:
        self.signal_name = signal_name
        super().__init__(signal_name)
