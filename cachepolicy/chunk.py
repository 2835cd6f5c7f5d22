"""Per-chunk value types and bookkeeping shared by the loops (:mod:`cachepolicy.loops`, :mod:`cachepolicy.rolling`).

:class:`ChunkBook` is the one mutable record of a chunk being generated (its noise, timing, attempts,
restarts and prunes); :class:`StepOutput` and :class:`Candidate` are what the ``after_step``,
``candidate_ready`` and ``before_commit`` hooks see.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.cache import CacheView
    from cachepolicy.noise import NoiseStream


@attrs.frozen(eq=False)
class StepOutput:
    """What ``after_step`` sees. Tensors are ``[B, C, F, H, W]`` in the model dtype.

    ``active[b]`` is False for a sample that is only being recomputed because another sample of the batch
    restarted the chunk; policies should not re-decide about it. ``view`` is the resident context (the
    chunk being generated is not part of it).
    """

    chunk: int
    attempt: int
    step: int
    num_steps: int
    timestep: float
    sigma: float
    frame_start: int
    x_t: torch.Tensor
    model_output: torch.Tensor
    x0: torch.Tensor
    active: torch.Tensor
    view: CacheView


@attrs.frozen(eq=False)
class Candidate:
    """The chunk's final x0 ``[B, C, F, H, W]`` before commit, with the attempt that produced it."""

    chunk: int
    attempt: int
    frame_start: int
    x0: torch.Tensor
    active: torch.Tensor
    view: CacheView
    restarts: tuple[int, ...]


@attrs.define(eq=False)
class ChunkBook:
    """The bookkeeping of one chunk while it is generated (created by ``Session.begin_chunk``).

    Attributes:
        chunk: the chunk index; ``frame_start`` its first absolute latent frame.
        noise: the rollout's noise stream; :meth:`draw` memoises each use, so a restart reuses it.
        started: ``time.perf_counter()`` when the chunk began.
        forward_seconds: time spent in model forwards (both guidance branches, re-encodes, restarts).
        attempt: restarts so far (a prune request restarts the chunk).
        active: bool ``[B]``: samples whose result the current attempt decides (see :class:`StepOutput`).
        restarts: per requesting policy spec, restarts of this chunk per sample.
        pruned_by: per policy spec, tokens its prune requests removed.
        record: trace fields of the chunk gathered on the way (recipe events, ``window_blocks``...).
        first_forward_done: whether the chunk's first forward ran (``ForwardCall.first``).
    """

    chunk: int
    frame_start: int
    noise: NoiseStream
    batch_size: int
    policies: tuple[str, ...]
    started: float = attrs.field(factory=time.perf_counter)
    forward_seconds: float = 0.0
    attempt: int = 0
    active: Any = None
    restarts: dict[str, list[int]] = attrs.field(init=False)
    pruned_by: dict[str, int] = attrs.field(factory=dict)
    record: dict[str, Any] = attrs.field(factory=dict)
    first_forward_done: bool = False
    _draws: dict[int, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        import torch

        self.restarts = {spec: [0] * self.batch_size for spec in self.policies}
        self.active = torch.ones(self.batch_size, dtype=torch.bool)

    def draw(self, use: int) -> torch.Tensor:
        """Noise ``[B, C, F, H, W]`` of ``use`` of this chunk (drawn once, then reused by restarts)."""
        if use not in self._draws:
            self._draws[use] = self.noise.draw(self.chunk, use)
        return self._draws[use]

    def retries_per_sample(self) -> tuple[int, ...]:
        """Restarts of this chunk per sample (the most any one policy caused)."""
        return tuple(max((counts[b] for counts in self.restarts.values()), default=0)
                     for b in range(self.batch_size))
