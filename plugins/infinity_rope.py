"""``infinity-rope``: window-relative RoPE positions, a KV flush at prompt switches and a RoPE cut at scene cuts
(∞-RoPE; Yesiltepe et al., arXiv 2511.20649). Docs: ``docs/policies/infinity-rope.md``.

The cache stores keys before RoPE (``rope_mode = "raw"``) and every forward places them anew
(``cachepolicy_rope_positions``), so positions never grow past the window however long the video:

* Block-relativistic RoPE: the resident frames, in frame order, sit at temporal positions ``0, 1, ...``
  (their rank among the resident frames; the sink, being first, is pinned at 0) and the call's own frames
  (queries and keys) right after them. Spatial positions are unchanged.
* Window: the sink (the first ``sink`` frames) and the last ``window - sink - F`` committed frames stay
  (``F`` frames per chunk), so a chunk attends to at most ``window`` frames, its own included.
* KV flush at a prompt switch (before the switch's chunk): keep the sink and the last ``flush_keep``
  resident frames, drop the rest, and mark the cross-attention keys/values stale (the new prompt's are
  computed; :meth:`KVCache.flush`).
* RoPE cut at a scene cut (a :class:`~cachepolicy.engine.PromptSwitch` with ``cut``, marked by a leading
  ``#`` on its prompts): during that chunk only, its own frames sit at ``cut_position .. cut_position + F - 1``
  instead of right after the resident frames; from the next chunk on, positions are window-relative again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from cachepolicy.errors import CompositionError, ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import RopePositions
from cachepolicy.policy import CacheBound, Policy, Selection, non_negative_int, positive_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.cache import CacheView
    from cachepolicy.engine import Session
    from cachepolicy.layers import ForwardCall
    from cachepolicy.models import ModelInfo


def frame_ranks(frames: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Window-relative positions: the rank of each token's frame among the resident frames of its sample.

    Args:
        frames: long ``[B, S]`` absolute latent frame of every table token.
        valid: bool ``[B, S]``.

    Returns:
        ``(ranks [B, S] long, 0 past a sample's length; distinct resident frames per sample)``.
    """
    import torch

    ranks = torch.zeros_like(frames)
    counts = []
    for b in range(frames.shape[0]):
        present = frames[b][valid[b]]
        distinct = torch.unique(present)  # sorted
        ranks[b][valid[b]] = torch.searchsorted(distinct, present)
        counts.append(int(distinct.numel()))
    return ranks, counts


class InfinityState:
    """Per-rollout state: the chunk whose own frames take the cut positions, flushes and cuts so far."""

    def __init__(self) -> None:
        self.cut_chunk: int | None = None
        self.flushed: bool = False
        self.own_start: int | None = None


@attrs.frozen
class InfinityRope(Policy):
    """Window-relative RoPE positions with a pinned sink, a KV flush at prompt switches, a RoPE cut at cuts.

    Attributes:
        window: latent frames a chunk attends to at most, its own included (the reference's
            ``local_attn_size``, 6).
        sink: leading latent frames kept forever, pinned at the first positions (``sink_size``, 1).
        flush_keep: resident frames after the sink kept by the KV flush at a prompt switch (the reference
            hard-codes 2).
        cut_position: the temporal position of a cut chunk's first frame (the reference's ``transition_from``, 45).
    """

    name: ClassVar[str] = "infinity-rope"
    summary: ClassVar[str] = "window-relative RoPE, KV flush at prompt switches, RoPE cut at scene cuts"
    rope_mode: ClassVar[str | None] = "raw"

    window: int = attrs.field(default=6, validator=positive_int)
    sink: int = attrs.field(default=1, validator=non_negative_int)
    flush_keep: int = attrs.field(default=2, validator=non_negative_int)
    cut_position: int = attrs.field(default=45, validator=positive_int)

    def check_compatible(self, model: ModelInfo) -> None:
        frames = model.frames_per_chunk
        if self.window < self.sink + frames:
            raise ParameterError(f"{self.name}: window={self.window} does not hold sink={self.sink} frames and a "
                                 f"chunk ({frames} frames); use window >= {self.sink + frames}")
        if self.cut_position < self.window - frames:
            raise ParameterError(f"{self.name}: cut_position={self.cut_position} is among the resident frames' "
                                 f"positions 0..{self.window - frames - 1}; use cut_position >= "
                                 f"{self.window - frames}")
        if self.cut_position + frames > model.max_frames:
            raise ParameterError(f"{self.name}: cut_position={self.cut_position} puts a chunk past the model's "
                                 f"RoPE table of {model.max_frames} frames; use cut_position <= "
                                 f"{model.max_frames - frames}")

    def cache_bound(self, model: ModelInfo) -> CacheBound:
        return CacheBound(kept_frames=self.window - model.frames_per_chunk - self.sink,
                          protected_frames=self.sink)

    def new_state(self) -> InfinityState:
        return InfinityState()

    @hookimpl
    def cachepolicy_session_start(self, session: Session) -> None:
        recipe = session.recipe
        if recipe is not None and (recipe.rolling or recipe.restart or recipe.recache):
            raise CompositionError(f"{self.name} places every call's positions itself; recipe {recipe.name!r} "
                                   f"moves positions or re-encodes frames too (use a plain chunk loop, e.g. "
                                   f"--recipe self-forcing)")

    @hookimpl
    def cachepolicy_chunk_start(self, session: Session, chunk: int) -> None:
        """At a prompt switch: the KV flush, and a cut if the switch is one."""
        import torch

        state: InfinityState = self.state(session)
        state.cut_chunk, state.flushed, state.own_start = None, False, None
        switch = next((s for s in session.config.prompt_switches if s.chunk == chunk), None)
        if switch is None:
            return
        view = session.cache.view()
        keep = view.valid & (view.frame < self.sink)
        for b in range(view.batch_size):
            tail = torch.unique(view.frame[b][view.valid[b] & (view.frame[b] >= self.sink)])
            last = tail[-self.flush_keep:] if self.flush_keep else tail[:0]
            keep[b] |= view.valid[b] & torch.isin(view.frame[b], last)
        session.cache.flush(keep)
        state.flushed = True
        if switch.cut:
            state.cut_chunk = chunk

    @hookimpl
    def cachepolicy_rope_positions(self, session: Session, call: ForwardCall) -> RopePositions:
        state: InfinityState = self.state(session)
        view = session.cache.view()
        ranks, counts = frame_ranks(view.frame, view.valid)
        if min(counts) != max(counts):
            raise CompositionError(f"{self.name}: the samples hold {counts} resident frames; window-relative "
                                   f"positions need the same number in every sample")
        own = self.cut_position if state.cut_chunk == call.chunk else counts[0]
        state.own_start = own
        return RopePositions(resident=ranks, own_start=own)

    @hookimpl
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection:
        frames = session.model.frames_per_chunk
        newest = (session.chunk + 1) * frames - 1
        kept = self.window - frames - self.sink
        return Selection(protect=view.valid & (view.frame < self.sink),
                         drop=view.valid & (view.frame <= newest - kept))

    @hookimpl
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any]:
        state: InfinityState = self.state(session)
        return {"kv_flush": state.flushed, "rope_cut": state.cut_chunk == chunk, "own_rope_start": state.own_start}


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [InfinityRope]
