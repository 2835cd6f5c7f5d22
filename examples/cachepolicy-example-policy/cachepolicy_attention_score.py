"""``attention-score``: each layer keeps the context tokens that recent queries attended to most.

Inside every layer, at the context pass of each chunk, the softmax attention mass that the chunk's queries
(every ``stride``-th one) give each resident token, summed over heads, is added to a per-layer score that
decays by ``decay`` per chunk (a policy-owned cache column: it moves with its token through compaction).
At ``select`` each layer keeps the ``budget`` frames' worth of older tokens with the highest score, and the
chunk just committed; tokens another policy protects (a sink, ``pinned``) stay and do not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerRequest
from cachepolicy.policy import CacheBound, Policy, Selection, finite_float, positive_int

if TYPE_CHECKING:  # only for type checkers: keeps discovery free of heavy imports
    from cachepolicy.layers import LayerContext

COLUMN = "attention-score"


@attrs.frozen
class AttentionScore(Policy):
    """Keep, per layer, the ``budget`` frames' worth of context tokens with the most recent attention."""

    name: ClassVar[str] = "attention-score"
    summary: ClassVar[str] = "per layer, keep the context tokens recent queries attend to most"

    budget: int = attrs.field(default=6, validator=positive_int)
    decay: float = attrs.field(default=0.5, validator=finite_float(0.0, 1.0))
    stride: int = attrs.field(default=4, validator=positive_int)

    def cache_bound(self, model):
        return CacheBound(kept_frames=self.budget + model.frames_per_chunk)

    @hookimpl
    def cachepolicy_session_start(self, session):
        import torch

        session.cache.add_column(COLUMN, shape=(session.model.num_layers,), dtype=torch.float32, fill=0.0)

    @hookimpl
    def cachepolicy_layer_request(self, session, call):
        return LayerRequest() if call.context else None  # every layer of each context pass

    @hookimpl
    def cachepolicy_layer(self, session, layer: LayerContext):
        mass = layer.attention_mass(layer.query[:, ::self.stride]).resident.sum(dim=1)  # [B, S]
        score = session.cache.column(COLUMN)[..., layer.index]  # writable [B, S] view
        score.mul_(self.decay).add_(mass)

    @hookimpl
    def cachepolicy_select(self, session, view):
        import torch

        older = view.valid & (view.chunk < session.chunk) & ~view.pinned  # pinned: protected (a sink)
        scores = view.columns[COLUMN].permute(2, 0, 1).masked_fill(~older, float("-inf"))  # [L, B, S]
        keep = self.budget * session.model.tokens_per_frame
        if scores.shape[-1] <= keep:
            return None
        top = scores.topk(keep, dim=-1).indices
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return Selection(drop=older & ~kept)


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    """Discovery hook: the policy classes this module provides."""
    return [AttentionScore]
