"""``deep-forcing``: Deep Sink + Participative Compression with the paper's settings (Deep Forcing; Yi, Jang,
Cho, Nam, Yoon, Kim, arXiv 2512.05081). Docs: ``docs/policies/deep-forcing.md``.

Participative Compression exactly as ``participative-compression`` (per layer, at the first call of a
chunk once the cache would exceed ``window``). In the same call, right after the first layer that compresses
has chosen its tokens and before it attends, the sink's keys are re-rotated along the temporal RoPE axis in
every layer (``deep-sink``'s arithmetic, :func:`~cachepolicy.plugins.deep_sink.sink_start`) so that it starts
at ``sigma = s - (kept + F*n) / n`` (``kept`` the layer's resident tokens after compression, ``F*n`` the
chunk's own): by ``window - budget`` frames the first time (the code's bootstrap), by ``sigma - base`` after
(``base`` the previous ``sigma``). Between compressions nothing moves. With W=21, S=10, N=16, R=4 and 3-frame
chunks: compressions at chunks 7, 9, 11, ... (cache 21 -> 16 -> 19 -> 16 frames), shifts 5 then 6.

Defaults are the paper's (W=21, S=10, N=16, R=4) with the released code's reuse limit 7 and ``sum`` fusion.
For a model trained on fewer frames, scale them (docs "deep-forcing").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from cachepolicy.hookspecs import hookimpl
from cachepolicy.plugins.deep_sink import SinkAlignment, _placement, refuse_raw_cache, sink_start
from cachepolicy.plugins.participative_compression import CompressionState, ParticipativeCompression
from cachepolicy.policy import Policy

if TYPE_CHECKING:  # pragma: no cover
    from cachepolicy.engine import Session
    from cachepolicy.layers import LayerContext


class DeepForcingState(CompressionState):
    """Participative Compression's state plus the sink's (:class:`SinkAlignment`) and whether the sink was
    re-aligned at the current chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.sink = SinkAlignment()
        self.aligned = False


@attrs.frozen
class DeepForcing(ParticipativeCompression):
    """Participative Compression with a Deep Sink re-aligned at each compression (the paper's method).

    Attributes:
        window, sink, budget, recent, reuse_limit, fusion: as ``participative-compression`` (defaults: the
            paper's W=21, S=10, N=16, R=4; the code's reuse limit 7 and ``sum``).
        placement: ``code`` (the reference code: ``sigma = s - L/n``, first shift ``window - budget``) or
            ``contiguous`` (the paper's Eq. 5-6 read as adjacency: ``F`` frames later, shift ``sigma - position``).
    """

    name: ClassVar[str] = "deep-forcing"
    summary: ClassVar[str] = "Deep Forcing: deep sink re-aligned + participative compression (paper settings)"

    placement: Literal["code", "contiguous"] = attrs.field(default="code", validator=_placement)

    def new_state(self) -> DeepForcingState:
        return DeepForcingState()

    @hookimpl
    def cachepolicy_session_start(self, session: Session) -> None:
        refuse_raw_cache(session, self.name)
        super().cachepolicy_session_start(session)

    @hookimpl
    def cachepolicy_chunk_start(self, session: Session, chunk: int) -> None:
        super().cachepolicy_chunk_start(session, chunk)
        state: DeepForcingState = self.state(session)
        state.sink.begin_chunk(session.batch_size)
        state.aligned = False

    @hookimpl
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any]:
        state: DeepForcingState = self.state(session)
        return {**super().cachepolicy_chunk_end(session, chunk), "sink_shift": list(state.sink.shifts),
                "sink_start": list(state.sink.position)}

    def _compressed(self, session: Session, layer: LayerContext, kept: list[int | None]) -> None:
        """The first layer to compress in a chunk re-aligns the sink of every layer (before it attends)."""
        state: DeepForcingState = self.state(session)
        if state.aligned:
            return
        state.aligned = True
        info = session.model
        n, frames = info.tokens_per_frame, info.frames_per_chunk
        view = layer.view
        sink_tokens = (view.valid & (view.frame < self.sink)).sum(dim=1).tolist()
        own = layer.key.shape[1]
        sigmas = [None if k is None else
                  sink_start(layer.call.frame_start, k + own, int(sink_tokens[b]), n, frames, self.placement)
                  for b, k in enumerate(kept)]
        state.sink.realign(session, self.sink, sigmas, self.window - self.budget, self.placement)


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [DeepForcing]
