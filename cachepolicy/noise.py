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
* :class:`OfficialNoise`: one generator seeded once, drawn in the order, shapes and layout of a system's
  official inference script (each recipe names its own: ``Recipe.official_noise``), so that with a real
  checkpoint the same seed on the same device and dtype gives that script's noise. The whole batch draws from
  one stream, as the scripts do: sample ``b`` depends on the batch, and restarts still reuse their draws.

The official orders (read from the scripts; docs "Recipes" gives file and line):

``self-forcing`` (Self Forcing, LongLive)
    ``randn([B, T, C, H, W])`` for all ``T`` frames first; chunk ``c`` starts from frames ``3c .. 3c+2`` of it;
    after each denoising step but the last, ``randn([B * F, C, H, W])`` (rows sample-major, then frame).
``rolling-forcing``
    the same initial draw; after a window call, for each of its blocks but the final one (ascending), one
    draw of the whole window ``randn([B * n, C, H, W])`` (``n`` its frames), of which the block uses its slice.
``causvid``
    per rollout of ``rollout_frames`` frames, ``randn([B, rollout_frames, C, H, W])`` (a later rollout's first
    chunk is the carried overlap and leaves its slice unused); after each step but the last,
    ``randn([B * F, C, H, W])``. CausVid's script sets no seed: its CUDA generator starts at PyTorch's default
    seed ``67280421310721``.
``skyreels`` (diffusers' ``SkyReelsV2DiffusionForcingPipeline``, ``prepare_latents``)
    per iteration of its long-video loop, one ``randn([B, C, T, H, W])`` in float32 (then cast): ``T`` is
    ``min(total, rollout_frames)`` for the first iteration, ``min(left + overlap_frames, rollout_frames)`` for a
    later one, whose first ``overlap_frames`` frames the carried prefix replaces (unused); chunk ``c`` takes
    frames ``c*F - origin ..`` of its iteration's draw. No other draw: UniPC is deterministic.
None of them draws for the context pass (context noise 0).
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
    as ``[B, C, F, H, W]`` on ``device`` in ``dtype``; ``num_chunks`` chunks of ``num_steps`` denoising steps."""

    seeds: tuple[int, ...]
    shape: tuple[int, int, int, int]
    device: Any
    dtype: Any
    num_chunks: int = 1
    num_steps: int = 1


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


#: the official draw orders :class:`OfficialNoise` knows (see the module docstring)
OFFICIAL_ORDERS = ("self-forcing", "rolling-forcing", "causvid", "skyreels")


def _rollout_frames(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None and instance.order == "skyreels":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ParameterError(f"OfficialNoise.{attribute.name} must be a positive integer"
                             + (" or None (one iteration)" if instance.order == "skyreels" else "")
                             + f", got {value!r}")


@attrs.frozen
class OfficialNoise(NoiseSource):
    """A system's official draw order from one generator seeded with ``seed`` (None: the rollout's first seed).

    Attributes:
        order: one of :data:`OFFICIAL_ORDERS`.
        seed: the generator's seed (the official script's ``--seed``).
        rollout_frames, overlap_frames: the rollout geometry in latent frames: CausVid's (``causvid``), or
            SkyReels' long-video iterations (``skyreels``: ``base_num_frames`` and ``overlap_history`` in latent
            frames; ``rollout_frames=None``: one iteration).
    """

    order: str = attrs.field()
    seed: int | None = None
    rollout_frames: int | None = attrs.field(default=21, validator=_rollout_frames)
    overlap_frames: int = attrs.field(default=3)

    @overlap_frames.validator
    def _check_overlap(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ParameterError(f"OfficialNoise.overlap_frames must be a positive integer, got {value!r}")

    @order.validator
    def _check_order(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in OFFICIAL_ORDERS:
            raise ParameterError(f"official noise order {value!r} is not known; choose one of "
                                 f"{', '.join(OFFICIAL_ORDERS)}")

    def stream(self, spec: NoiseSpec) -> NoiseStream:
        return _OfficialStream(self, spec)


class _OfficialStream(NoiseStream):
    def __init__(self, source: OfficialNoise, spec: NoiseSpec) -> None:
        import torch

        self.source = source
        self.spec = spec
        seed = spec.seeds[0] if source.seed is None else source.seed
        self.generator = torch.Generator(spec.device).manual_seed(seed)
        self.initial: dict[int, Any] = {}  # per rollout (one, except CausVid's restarts)

    def _randn(self, *shape: int) -> torch.Tensor:
        import torch

        return torch.randn(shape, generator=self.generator, device=self.spec.device, dtype=self.spec.dtype)

    def _frames(self, noise: torch.Tensor, start: int, frames: int) -> torch.Tensor:
        """``[B, T, C, H, W]`` frames ``start ..`` as ``[B, C, F, H, W]``."""
        return noise[:, start:start + frames].permute(0, 2, 1, 3, 4)

    def draw(self, chunk: int, use: int) -> torch.Tensor:
        spec, source = self.spec, self.source
        channels, frames, height, width = spec.shape
        batch = len(spec.seeds)
        if source.order == "skyreels":
            if use != 0:
                raise ParameterError(f"SkyReels' pipeline draws only initial noise (its UniPC solver is "
                                     f"deterministic), not use {use} of chunk {chunk}")
            return self._skyreels(chunk)
        if use >= spec.num_steps:
            raise ParameterError(f"the {source.order} script draws no context-pass noise (its context noise is 0)")
        if use == 0:
            rollout, block, total = 0, chunk, spec.num_chunks * frames
            if source.order == "causvid":
                first = source.rollout_frames // frames
                per = (source.rollout_frames - source.overlap_frames) // frames
                rollout = 0 if chunk < first else 1 + (chunk - first) // per
                block = chunk if rollout == 0 else 1 + (chunk - first) % per
                total = source.rollout_frames
            if rollout not in self.initial:
                self.initial[rollout] = self._randn(batch, total, channels, height, width)
            return self._frames(self.initial[rollout], block * frames, frames)
        if source.order == "rolling-forcing":  # drawn in window chunk + use - 1, shaped like the whole window
            window = chunk + use - 1
            first = max(0, window - spec.num_steps + 1)
            last = min(spec.num_chunks - 1, window)
            size = frames * (last - first + 1)
            noise = self._randn(batch * size, channels, height, width).view(batch, size, channels, height, width)
            return self._frames(noise, (chunk - first) * frames, frames)
        noise = self._randn(batch * frames, channels, height, width).view(batch, frames, channels, height, width)
        return self._frames(noise, 0, frames)

    def _skyreels(self, chunk: int) -> torch.Tensor:
        """Chunk ``chunk``'s frames of its iteration's ``randn([B, C, T, H, W])`` (float32, then cast)."""
        import torch

        spec, source = self.spec, self.source
        channels, frames, height, width = spec.shape
        total = spec.num_chunks * frames
        rollout = total if source.rollout_frames is None else source.rollout_frames
        start = chunk * frames
        if start < rollout:
            iteration, origin = 0, 0
        else:
            new_frames = rollout - source.overlap_frames
            iteration = 1 + (start - rollout) // new_frames
            origin = rollout + (iteration - 1) * new_frames - source.overlap_frames
        if iteration not in self.initial:
            shape = (len(spec.seeds), channels, min(total - origin, rollout), height, width)
            noise = torch.randn(shape, generator=self.generator, device=spec.device, dtype=torch.float32)
            self.initial[iteration] = noise.to(spec.dtype)
        return self.initial[iteration][:, :, start - origin:start - origin + frames]
