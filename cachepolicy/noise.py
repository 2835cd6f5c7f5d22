"""Noise sources: where a rollout's random draws come from (``RolloutConfig.noise``).

A loop asks for the noise of one *use* of one chunk: use ``0`` is the chunk's initial noise, use ``i`` the
re-noising before denoising step ``i`` and use ``len(steps)`` the context-pass noise (drawn only when the
sampler's ``context_noise > 0``). Each use is drawn once per chunk and reused when a prune request restarts
the chunk. Rolling Forcing's window draws the uses of block ``b`` as chunk ``b``.

* :class:`SeededNoise` (the default): every ``[C, F, H, W]`` draw comes from its own CPU generator seeded by
  ``(sample seed, chunk, use)``, so noise never depends on what happened earlier (restarts, other policies):
  runs with different policies stay comparable seed for seed, and a batched run equals each sample alone.
* :class:`RecordedNoise`: tensors given by the caller, e.g. the draws recorded from a reference
  implementation, so a test feeds them without monkeypatching.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from cachepolicy.errors import ParameterError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def noise_seed(seed: int, chunk: int, use: int) -> int:
    """Deterministic 63-bit generator seed for (sample seed, chunk, use)."""
    digest = hashlib.blake2b(f"{seed}:{chunk}:{use}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@attrs.frozen(eq=False)
class NoiseSpec:
    """What a rollout's noise looks like: one ``shape`` ``[C, F, H, W]`` draw per sample (``seeds``), returned
    as ``[B, C, F, H, W]`` on ``device`` in ``dtype``."""

    seeds: tuple[int, ...]
    shape: tuple[int, int, int, int]
    device: Any
    dtype: Any


class NoiseStream(abc.ABC):
    """The per-rollout state of a :class:`NoiseSource` (the one place a stateful source keeps its generator)."""

    @abc.abstractmethod
    def draw(self, chunk: int, use: int) -> torch.Tensor:
        """The noise ``[B, C, F, H, W]`` of ``use`` of ``chunk`` (each pair is asked for at most once)."""


class NoiseSource(abc.ABC):
    """Where a rollout's noise comes from (``RolloutConfig.noise``); frozen, one per configuration."""

    @abc.abstractmethod
    def stream(self, spec: NoiseSpec) -> NoiseStream:
        """A fresh stream for one rollout."""


@attrs.frozen
class SeededNoise(NoiseSource):
    """Per-(sample seed, chunk, use) draws, each from its own CPU generator (float32, then cast)."""

    def stream(self, spec: NoiseSpec) -> NoiseStream:
        return _SeededStream(spec)


class _SeededStream(NoiseStream):
    def __init__(self, spec: NoiseSpec) -> None:
        self.spec = spec

    def draw(self, chunk: int, use: int) -> torch.Tensor:
        import torch

        spec = self.spec
        draws = [torch.randn(spec.shape, generator=torch.Generator("cpu").manual_seed(noise_seed(seed, chunk, use)),
                             dtype=torch.float32) for seed in spec.seeds]
        return torch.stack(draws).to(device=spec.device, dtype=spec.dtype)


def _recorded(value: Any) -> dict[tuple[int, int], Any]:
    if not isinstance(value, Mapping):
        raise ParameterError(f"RecordedNoise needs a mapping {{(chunk, use): tensor}}, got {type(value).__name__}")
    out = {}
    for key, tensor in value.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key)):
            raise ParameterError(f"RecordedNoise keys are (chunk, use) pairs of ints, got {key!r}")
        out[key] = tensor
    return out


@attrs.frozen(eq=False)
class RecordedNoise(NoiseSource):
    """Noise given by the caller: ``draws[(chunk, use)]`` is ``[B, C, F, H, W]`` (or ``[C, F, H, W]`` for every
    sample). A use the rollout asks for that is missing raises :class:`ParameterError` naming it."""

    draws: dict[tuple[int, int], Any] = attrs.field(converter=_recorded)

    def stream(self, spec: NoiseSpec) -> NoiseStream:
        return _RecordedStream(self, spec)


class _RecordedStream(NoiseStream):
    def __init__(self, source: RecordedNoise, spec: NoiseSpec) -> None:
        self.source = source
        self.spec = spec

    def draw(self, chunk: int, use: int) -> torch.Tensor:
        spec = self.spec
        try:
            tensor = self.source.draws[(chunk, use)]
        except KeyError:
            raise ParameterError(f"recorded noise has no draw for chunk {chunk}, use {use}") from None
        batch = len(spec.seeds)
        if tuple(tensor.shape) == spec.shape:
            tensor = tensor.unsqueeze(0).expand(batch, *spec.shape)
        if tuple(tensor.shape) != (batch, *spec.shape):
            raise ParameterError(f"recorded noise for chunk {chunk}, use {use} has shape {tuple(tensor.shape)}; "
                                 f"expected {[batch, *spec.shape]} or {list(spec.shape)}")
        return tensor.to(device=spec.device, dtype=spec.dtype)
