"""``sliding-window``: keep the N most recent context frames (StreamingLLM's recency window, in frames).

Semantics: after chunk ``c`` is committed, every resident token whose absolute latent frame is older than
the ``frames`` most recent committed frames is dropped (unless another policy protects it). The next
chunk therefore attends to ``frames`` context frames plus its own ``frames_per_chunk`` frames.

Mapping to the peers (``F`` = 3 frames per chunk, all values in latent frames):

* Self Forcing ``local_attn_size=A, sink_size=S`` counts the chunk's own frames and the sink inside A:
  it equals ``attention-sink:frames=S+sliding-window:frames=A-S-F`` (``sliding-window:frames=A-F``
  without a sink).
* LongLive (``local_attn_size=12``, sink 3): ``attention-sink:frames=3+sliding-window:frames=6``.

A window shorter than one chunk (``frames < frames_per_chunk``) is refused: it would drop part of the
chunk just committed, which no peer system does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

from cachepolicy.errors import ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import CacheBound, Policy, Selection, positive_int

if TYPE_CHECKING:  # pragma: no cover
    from cachepolicy.cache import CacheView
    from cachepolicy.engine import Session
    from cachepolicy.models import ModelInfo


@attrs.frozen
class SlidingWindow(Policy):
    """Drop context tokens older than the ``frames`` most recent committed latent frames.

    Attributes:
        frames: context frames kept (latent frames, at least one chunk).
    """

    name: ClassVar[str] = "sliding-window"
    summary: ClassVar[str] = "keep the N most recent context frames"

    frames: int = attrs.field(default=12, validator=positive_int)

    def check_compatible(self, model: ModelInfo) -> None:
        if self.frames < model.frames_per_chunk:
            raise ParameterError(
                f"sliding-window: frames={self.frames} is shorter than one chunk; the model commits "
                f"{model.frames_per_chunk} frames per chunk, so use frames >= {model.frames_per_chunk}"
            )

    def cache_bound(self, model: ModelInfo) -> CacheBound:
        """It keeps at most ``frames`` context frames (plus what other policies protect)."""
        return CacheBound(kept_frames=self.frames)

    @hookimpl
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection:
        newest = (session.chunk + 1) * session.model.frames_per_chunk - 1
        return Selection(drop=view.valid & (view.frame <= newest - self.frames))


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [SlidingWindow]
