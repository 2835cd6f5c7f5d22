"""``participative-compression``: per-layer top-C retention by the raw logits of recent queries (Deep Forcing's
Participative Compression; arXiv 2512.05081). Docs: ``docs/policies/participative-compression.md``.

Units: ``n`` tokens per latent frame, ``F`` frames per chunk, all parameters in latent frames. Per layer
``l`` (each layer keeps its own tokens, query ring and reuse counters), on every forward of a chunk (each
denoising step and the context pass):

1. Query ring: ``ring_l <- the last R*n rows of [ring_l ; q]``, ``q`` the call's queries after RoPE
   ``[B, F*n, H, D]``; so at a chunk's first call it holds the last ``R - F`` frames of the previous context
   pass's queries and the chunk's own (noisy) queries.
2. Trigger: the chunk's first call (its first denoising step), when ``resident_l + F*n > W*n``.
3. Compression of layer ``l`` (the reference code's arithmetic): ``K = [resident keys ; the call's own keys]``
   (``T`` tokens, post-RoPE); ``phi_j = sum over ring rows and heads of <q_r, k_j> / (sqrt(D) * H)`` (``sum``
   fusion: the ring rows are summed first, then one dot product over ``H*D``; ``max`` fusion: the largest
   per-row dot product), float32. The sink (tokens of frames ``< S``) and the last ``R_eff = min(|ring|, T)``
   tokens of ``K`` are protected; the others are candidates, except those already selected ``reuse_limit``
   times in this layer. The ``C = min(N, W)*n - S*n - R_eff`` eligible candidates of highest ``phi``
   (``torch.topk``; its tie order) are kept with the sink and the recent tokens; every other resident token
   leaves layer ``l`` before it attends. Kept candidates' counters go up by one.

Tokens keep their positions (no RoPE change; ``deep-forcing`` adds the Deep Sink re-alignment). Evicted
tokens are gone (no merging). The sink is also protected at every selection, so no other policy evicts it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from cachepolicy.errors import CompositionError, ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerEdit, LayerRequest
from cachepolicy.policy import CacheBound, Policy, Selection, non_negative_int, positive_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.cache import CacheView
    from cachepolicy.engine import Session
    from cachepolicy.layers import ForwardCall, LayerContext
    from cachepolicy.models import ModelInfo

#: the per-token, per-layer cache column counting Top-C selections
REUSE_COLUMN = "participative-reuse"
FUSIONS = ("sum", "max")


def update_ring(ring: torch.Tensor | None, queries: torch.Tensor, rows: int) -> torch.Tensor:
    """``ring <- the last rows of [ring ; queries]`` (tokens along dim 1).

    Args:
        ring: ``[B, r, H, D]`` queries kept so far, or None.
        queries: ``[B, n, H, D]`` the call's queries after RoPE.
        rows: the ring's capacity in query tokens (``R * tokens_per_frame``).
    """
    import torch

    queries = queries.detach()
    ring = queries if ring is None else torch.cat([ring, queries], dim=1)
    return ring[:, -rows:] if ring.shape[1] > rows else ring


def participation_scores(ring: torch.Tensor, keys: torch.Tensor, fusion: str = "sum") -> torch.Tensor:
    """``phi_j`` for every key of one sample: float32 ``[T]``.

    Args:
        ring: ``[r, H, D]`` recent queries after RoPE.
        keys: ``[T, H, D]`` keys after RoPE.
        fusion: ``sum`` (``(sum_r q_r) . k_j`` over all heads, the paper's Eq. 7 and the code's default) or
            ``max`` (``max_r q_r . k_j``).

    Both are scaled by ``1 / (sqrt(D) * H)`` and computed with the reference code's operations (a batched
    matrix product in the keys' dtype, then float32), so that ties break as there.
    """
    import torch

    rows, heads, dim = ring.shape
    scale = 1.0 / (math.sqrt(dim) * heads)
    k_trans = keys.reshape(1, keys.shape[0], heads * dim).transpose(1, 2).contiguous()
    flat = ring.reshape(1, rows, heads * dim)
    if fusion == "sum":
        fused = torch.bmm(flat.sum(dim=1, keepdim=True), k_trans).squeeze(1).to(torch.float32)
        return fused.mul_(scale)[0]
    scores = torch.matmul(flat, k_trans).to(torch.float32).mul_(scale)  # [1, r, T]
    return scores.amax(dim=1)[0]


def top_candidates(scores: torch.Tensor, candidates: torch.Tensor, eligible: torch.Tensor,
                   count: int) -> torch.Tensor:
    """Indices (sorted ascending) of the ``count`` eligible candidates of highest score (fewer if fewer are
    eligible).

    Args:
        scores: float ``[T]``.
        candidates: long ``[c]`` positions that may be selected, ascending.
        eligible: bool ``[c]``: candidates under the reuse limit.
        count: ``C``, tokens to keep.
    """
    import torch

    allowed = candidates[eligible]
    k = min(count, allowed.numel())
    if k <= 0:
        return allowed[:0]
    _, top = torch.topk(scores[candidates][eligible], k=k, dim=0)
    return torch.sort(allowed[top])[0]


def _fusion(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in FUSIONS:
        raise ParameterError(f"{type(instance).name}: {attribute.name}={value!r} is not allowed; choose one of "
                             f"{', '.join(FUSIONS)}")


class CompressionState:
    """Mutable per-rollout state (in ``session.policy_state``).

    Attributes:
        rings: per layer, the query ring ``[B, <= R*n, H, D]`` (None before the first call).
        compressed: per layer, whether it compressed at the current chunk.
        excluded: per layer, candidates excluded by the reuse limit at the current chunk (summed over samples).
    """

    def __init__(self) -> None:
        self.rings: dict[int, Any] = {}
        self.compressed: dict[int, bool] = {}
        self.excluded: dict[int, int] = {}


@attrs.frozen
class ParticipativeCompression(Policy):
    """Per layer, at the first call of a chunk once the cache exceeds ``window``, keep the sink, the ``recent``
    frames and the top-C tokens by the raw logits of the last ``recent`` frames of queries.

    Attributes:
        window: W, the most latent frames a layer attends to (the chunk's own included; Self Forcing's
            ``local_attn_size``).
        sink: S, leading latent frames never compressed (and protected from every policy).
        budget: N, latent frames a layer keeps after a compression (the chunk's own included).
        recent: R, frames of queries scored and of latest tokens kept (the chunk's own included).
        reuse_limit: a token selected this many times in a layer is no longer a candidate there (the
            reference code's ``PC_topc_max_reuse``; 0: no limit).
        fusion: ``sum`` or ``max`` over the recent queries.
    """

    name: ClassVar[str] = "participative-compression"
    summary: ClassVar[str] = "per-layer top-C tokens by recent queries' logits (Deep Forcing's compression)"
    #: marks policies that evict inside the layers at a chunk's first call (``deep-sink`` refuses them)
    compresses_in_layers: ClassVar[bool] = True

    window: int = attrs.field(default=21, validator=positive_int)
    sink: int = attrs.field(default=10, validator=non_negative_int)
    budget: int = attrs.field(default=16, validator=positive_int)
    recent: int = attrs.field(default=4, validator=positive_int)
    reuse_limit: int = attrs.field(default=7, validator=non_negative_int)
    fusion: Literal["sum", "max"] = attrs.field(default="sum", validator=_fusion)

    def __attrs_post_init__(self) -> None:
        if self.sink + self.recent > self.budget:
            raise ParameterError(f"{self.name}: sink={self.sink} + recent={self.recent} frames exceed budget="
                                 f"{self.budget}; the budget must hold the sink and the recent frames")
        if self.budget > self.window:
            raise ParameterError(f"{self.name}: budget={self.budget} is larger than window={self.window}; a "
                                 f"compression keeps at most the window")

    def check_compatible(self, model: ModelInfo) -> None:
        if self.recent < model.frames_per_chunk:
            raise ParameterError(
                f"{self.name}: recent={self.recent} is shorter than a chunk ({model.frames_per_chunk} frames); "
                f"the recent frames hold the chunk being generated, so use recent >= {model.frames_per_chunk}")
        if self.window < model.frames_per_chunk:
            raise ParameterError(f"{self.name}: window={self.window} is shorter than a chunk "
                                 f"({model.frames_per_chunk} frames)")

    def cache_bound(self, model: ModelInfo) -> CacheBound:
        return CacheBound(kept_frames=self.window)

    def new_state(self) -> CompressionState:
        return CompressionState()

    # ------------------------------------------------------------------------------------------ hooks
    @hookimpl
    def cachepolicy_session_start(self, session: Session) -> None:
        session.cache.add_column(REUSE_COLUMN, shape=(session.model.num_layers,), dtype=_long(), fill=0)

    @hookimpl
    def cachepolicy_chunk_start(self, session: Session, chunk: int) -> None:
        state: CompressionState = self.state(session)
        state.compressed = {}
        state.excluded = {}

    @hookimpl
    def cachepolicy_layer_request(self, session: Session, call: ForwardCall) -> LayerRequest | None:
        return LayerRequest() if call.phase in ("step", "context") else None

    @hookimpl
    def cachepolicy_layer(self, session: Session, layer: LayerContext) -> LayerEdit | None:
        state: CompressionState = self.state(session)
        n = session.model.tokens_per_frame
        ring = update_ring(state.rings.get(layer.index), layer.query, self.recent * n)
        state.rings[layer.index] = ring
        if not layer.call.first or layer.call.phase != "step":
            return None
        if len(layer.cells) != 1:
            raise CompositionError(
                f"{self.name} keeps one token set per layer, shared by its heads, but layer {layer.index} was "
                f"split into head groups {[list(c.heads) for c in layer.cells]} by another policy")
        return self._compress(session, layer, ring, state)

    @hookimpl
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection:
        return Selection(protect=view.valid & (view.frame < self.sink))

    @hookimpl
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any]:
        state: CompressionState = self.state(session)
        layers = range(session.model.num_layers)
        return {"compressed_layers": sum(bool(state.compressed.get(i)) for i in layers),
                "reuse_excluded": [state.excluded.get(i, 0) for i in layers]}

    # -------------------------------------------------------------------------------------- compression
    def _compress(self, session: Session, layer: LayerContext, ring: torch.Tensor,
                  state: CompressionState) -> LayerEdit | None:
        """Compress ``layer`` if it would overflow the window; returns the drop over the table."""
        import torch

        n = session.model.tokens_per_frame
        cell = layer.cells[0]
        own = layer.key.shape[1]
        lengths = cell.valid.sum(dim=1).tolist()
        if not any(length + own > self.window * n for length in lengths):
            return None
        view = layer.view
        column = session.cache.column(REUSE_COLUMN)
        own_frames = layer.call.frame_start + torch.arange(own, device=view.frame.device) // n
        drop = torch.zeros_like(view.valid)
        kept_lengths: list[int | None] = []
        excluded = 0
        for b, length in enumerate(lengths):
            if length + own <= self.window * n:
                kept_lengths.append(None)
                continue
            slots = cell.slots[b, :length]
            keys = torch.cat([cell.rotated_keys[b, :length], layer.key[b]], dim=0)  # [T, H, D]
            total = keys.shape[0]
            recent = min(ring.shape[1], total)
            scores = participation_scores(ring[b, -recent:], keys, self.fusion)
            sink = torch.cat([view.frame[b, slots] < self.sink, own_frames < self.sink])
            forced_sink = int(sink.sum())
            cap = min(max(min(self.budget * n, self.window * n), forced_sink + recent), total)
            top_c = max(0, cap - forced_sink - recent)
            positions = torch.arange(max(0, total - recent), device=keys.device)
            candidates = positions[~sink[:positions.numel()]]
            counts = column[b, slots[candidates], layer.index] if candidates.numel() else candidates
            eligible = counts < self.reuse_limit if self.reuse_limit > 0 else torch.ones_like(candidates,
                                                                                              dtype=torch.bool)
            excluded += int((~eligible).sum())
            top = top_candidates(scores, candidates, eligible, top_c)
            keep = sink.clone()
            keep[total - recent:] = True
            keep[top] = True
            resident_keep = keep[:length]
            drop[b, slots[~resident_keep]] = True
            column[b, slots[top], layer.index] += 1
            kept_lengths.append(int(resident_keep.sum()))
        state.compressed[layer.index] = True
        state.excluded[layer.index] = excluded
        self._compressed(session, layer, kept_lengths)
        return LayerEdit(drop=drop)

    def _compressed(self, session: Session, layer: LayerContext, kept: list[int | None]) -> None:
        """Called after ``layer`` compressed, before it attends: ``kept[b]`` resident tokens of sample ``b``
        stay (None: sample ``b`` did not compress). Nothing here; ``deep-forcing`` re-aligns its sink."""


def _long() -> Any:
    import torch

    return torch.long


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [ParticipativeCompression]
