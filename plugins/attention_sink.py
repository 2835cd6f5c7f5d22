"""``attention-sink``: the first S latent frames are never evicted (StreamingLLM, Xiao et al. 2023).

Semantics: every resident token of absolute latent frame ``< frames`` is protected at every selection,
so no other policy (a window, TokenTrim) can evict it; protect beats drop. Protected tokens are flagged
``pinned`` in the cache metadata. The sink is stored like any other token (keys after RoPE at their
absolute position, as in Self Forcing and LongLive).

Mapping: Self Forcing / LongLive ``sink_size=S`` -> ``attention-sink:frames=S`` (LongLive uses 3). Rolling
Forcing's anchor is the first 3-frame block, but re-rotated on every read (a RoPE mode, not this policy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import CacheBound, Policy, Selection, positive_int

if TYPE_CHECKING:  # pragma: no cover
    from cachepolicy.cache import CacheView
    from cachepolicy.engine import Session
    from cachepolicy.models import ModelInfo


@attrs.frozen
class AttentionSink(Policy):
    """Protect the tokens of the first ``frames`` latent frames forever.

    Attributes:
        frames: sink size in latent frames (3 = the first chunk of a Wan AR model).
    """

    name: ClassVar[str] = "attention-sink"
    summary: ClassVar[str] = "never evict the first S frames"

    frames: int = attrs.field(default=3, validator=positive_int)

    def cache_bound(self, model: ModelInfo) -> CacheBound:
        """It protects ``frames`` frames from every other policy's drops."""
        return CacheBound(protected_frames=self.frames)

    @hookimpl
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection:
        return Selection(protect=view.valid & (view.frame < self.frames))


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [AttentionSink]
