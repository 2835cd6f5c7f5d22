"""What a policy sees and may change *inside* a layer of a model forward (the in-layer hooks).

Most policies decide once per chunk, at ``select``, from token metadata. Some need the forward itself:
Deep Forcing scores resident tokens by the logits of recent queries at the first call of a chunk,
Dummy Forcing classifies heads by the attention mass of sampled queries during a context pass. For them
the engine describes every model forward as a :class:`ForwardCall`; a policy that returns a
:class:`LayerRequest` for a call from ``cachepolicy_layer_request`` gets ``cachepolicy_layer`` once per
layer of that forward with a :class:`LayerContext` (the call's queries, keys and values, the layer's
resident keys and values, scoring helpers) and may return a :class:`LayerEdit` (drop tokens from this
layer or some of its heads, merge tokens), applied before the layer attends.

Calls nobody requests run the plain per-layer path: nothing here is computed. Units: ``S`` is the
resident length of the cache view (table positions, :class:`~cachepolicy.cache.CacheView`), ``n`` the
tokens of the call, ``H`` heads, ``D`` head dim; tensors live on the model's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from cachepolicy.errors import ParameterError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.cache import CacheView

#: ``ForwardCall.phase`` values: a denoising step (or a Rolling Forcing window call), the context pass that
#: commits a chunk, and a re-encoding pass over already committed frames (LongLive's re-cache).
PHASES = ("step", "context", "reencode")


@attrs.frozen(eq=False)
class ForwardCall:
    """One model forward, as the engine describes it to the adapter, the cache and in-layer hooks.

    Attributes:
        chunk: the chunk being generated (a Rolling Forcing window: its first block; a re-encode: the
            chunk that triggered it).
        phase: one of :data:`PHASES`.
        frame_start: absolute latent frame of the call's first frame.
        num_frames: latent frames in the call (one chunk; a Rolling Forcing window holds several).
        rope_start: RoPE frame position of the call's first frame (its queries and own keys).
        step: the denoising step index for ``phase="step"`` (a window call: its first block's), else None.
        attempt: restarts of this chunk so far (a prune request restarts it).
        first: the chunk's first forward (its first step of its first attempt).
        branch: 0 for the conditional forward, 1 for the unconditional one under classifier-free guidance.
        visible: bool ``[B, S]``: the resident tokens this call attends to (None: all).
        rope_positions: long ``[B, S]``: RoPE frame positions resident keys are rotated to for this call
            (None: their ``rope_pos``); needs a ``rope_mode="raw"`` cache.
    """

    chunk: int
    phase: str = attrs.field()
    frame_start: int = attrs.field()
    num_frames: int = attrs.field()
    rope_start: int = attrs.field()
    step: int | None = None
    attempt: int = 0
    first: bool = False
    branch: int = 0
    visible: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None

    @phase.validator
    def _check_phase(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in PHASES:
            raise ParameterError(f"ForwardCall.phase={value!r} is not allowed; choose one of {', '.join(PHASES)}")

    @property
    def context(self) -> bool:
        """True for the context pass that commits the chunk."""
        return self.phase == "context"


@attrs.frozen
class LayerRequest:
    """A policy asks to run inside the layers of one forward (returned from ``cachepolicy_layer_request``).

    Attributes:
        layers: the layers to visit (None: every layer), e.g. ``(1,)`` for a selection computed in one layer.
    """

    layers: tuple[int, ...] | None = attrs.field(default=None, converter=lambda v: None if v is None else tuple(v))

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


@attrs.frozen(eq=False)
class CellView:
    """The resident storage of one head group of a layer (the conditional branch's).

    Attributes:
        heads: the layer's heads this group holds.
        keys, values: ``[B, S_c, H_c, D]`` as stored (keys after RoPE in ``absolute`` mode, before it in
            ``raw`` mode); ``S_c`` is the group's longest resident length. Views of the storage: do not
            write to them (edits go through :class:`LayerEdit`).
        slots: long ``[B, S_c]``: the table position (index into :class:`~cachepolicy.cache.CacheView`)
            of each stored token; entries past ``valid`` are meaningless.
        valid: bool ``[B, S_c]``.
        rotated_keys: ``[B, S_c, H_c, D]`` the keys after RoPE at their ``rope_pos`` (the stored keys in
            absolute mode; rotated on first use in raw mode).
    """

    heads: tuple[int, ...]
    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor
    _rotate: Callable[[], torch.Tensor] = attrs.field(alias="rotate", repr=False)
    _rotated: list = attrs.field(factory=list, init=False, repr=False)

    @property
    def rotated_keys(self) -> torch.Tensor:
        if not self._rotated:
            self._rotated.append(self._rotate())
        return self._rotated[0]


@attrs.frozen(eq=False)
class AttentionMass:
    """Softmax attention probability per key, averaged over query rows.

    Attributes:
        resident: float32 ``[B, H, S]`` over the table (0 where the head does not hold the token).
        own: float32 ``[B, H, n]`` over the call's own tokens.
    """

    resident: torch.Tensor
    own: torch.Tensor


@attrs.frozen(eq=False)
class LayerContext:
    """Layer ``index`` of a requested forward, before it attends (the conditional branch).

    Attributes:
        index: the layer.
        call: the forward.
        query, key: ``[B, n, H, D]`` the call's queries and own keys after RoPE at the call's positions.
        query_raw, key_raw: the same before RoPE (after the q/k norms).
        value: ``[B, n, H, D]`` the call's own values.
        view: the table of resident tokens (metadata ``[B, S]``).
        cells: the layer's head groups (one holding every head unless a policy split them).
        num_heads: heads of the layer.
    """

    index: int
    call: ForwardCall
    query: torch.Tensor
    query_raw: torch.Tensor
    key: torch.Tensor
    key_raw: torch.Tensor
    value: torch.Tensor
    view: CacheView
    cells: tuple[CellView, ...]
    num_heads: int

    def _table(self, fill: float) -> torch.Tensor:
        """A float32 ``[B, H, S + 1]`` buffer; column ``S`` absorbs writes of padding slots."""
        import torch

        batch, size = self.view.valid.shape
        return torch.full((batch, self.num_heads, size + 1), fill, dtype=torch.float32, device=self.query.device)

    def logits(self, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Raw attention logits summed over query rows: float32 ``[B, H, S]`` with
        ``out[b, h, s] = sum_r <q[b, r, h], k[b, s, h]> / sqrt(D)`` for the resident post-RoPE keys of every
        head that holds token ``s`` (``-inf`` elsewhere and past a sample's length).

        ``queries``: ``[B, R, H, D]`` post-RoPE rows (default: this call's queries). Cost: one
        ``[B, H, D] x [B, S, H, D]`` product per head group; nothing is materialised per query row.
        """
        import torch

        rows = self.query if queries is None else queries
        out = self._table(-math.inf)
        scale = 1.0 / math.sqrt(rows.shape[-1])
        summed = rows.float().sum(dim=1)  # [B, H, D]
        for cell in self.cells:
            heads = list(cell.heads)
            scores = torch.einsum("bhd,bshd->bhs", summed[:, heads], cell.rotated_keys.float()) * scale
            _scatter_heads(out, heads, cell, scores)
        return out[..., :-1]

    def attention_mass(self, queries: torch.Tensor | None = None) -> AttentionMass:
        """Softmax probability of every key a head attends to (its resident tokens and the call's own),
        averaged over ``queries`` ``[B, R, H, D]`` (post-RoPE; default: this call's queries). Cost: one
        ``R x (S_c + n)`` score matrix per head group, so sample a few rows of long calls."""
        import torch

        rows = (self.query if queries is None else queries).float()
        scale = 1.0 / math.sqrt(rows.shape[-1])
        resident = self._table(0.0)
        own = torch.zeros(rows.shape[0], self.num_heads, self.key.shape[1], dtype=torch.float32,
                          device=rows.device)
        for cell in self.cells:
            heads = list(cell.heads)
            size = cell.slots.shape[1]
            keys = torch.cat([cell.rotated_keys.float(), self.key[:, :, heads].float()], dim=1)
            scores = torch.einsum("brhd,bshd->bhrs", rows[:, :, heads], keys) * scale
            padding = torch.cat([~cell.valid, cell.valid.new_zeros(cell.valid.shape[0], keys.shape[1] - size)], 1)
            probs = scores.masked_fill(padding[:, None, None, :], -math.inf).softmax(dim=-1).mean(dim=2)
            _scatter_heads(resident, heads, cell, probs[..., :size])
            own[:, heads] = probs[..., size:]
        return AttentionMass(resident=resident[..., :-1], own=own)


def _scatter_heads(out: torch.Tensor, heads: list[int], cell: CellView, values: torch.Tensor) -> None:
    """Write ``values`` ``[B, H_c, S_c]`` of a head group into ``out`` ``[B, H, S + 1]`` at the cell's
    slots; padding slots write to column ``S``."""
    slots = cell.slots.masked_fill(~cell.valid, out.shape[-1] - 1)
    for i, head in enumerate(heads):
        out[:, head].scatter_(1, slots, values[:, i])


@attrs.frozen(eq=False)
class Merge:
    """Replace target tokens' keys and values by weighted combinations of source tokens; then the sources
    (those not also targets) leave the cells the merge applies to.

    Attributes:
        target: long ``[B, M]`` table positions of the tokens that receive a combination (``-1``: unused).
        sources: long ``[B, M, K]`` table positions combined into each target.
        weights: ``[B, M, K]`` (every head) or ``[B, M, K, H]`` (per head) combination weights; the new
            key of target ``m`` is ``sum_k weights[m, k] * key[sources[m, k]]``, the value likewise.
    """

    target: torch.Tensor
    sources: torch.Tensor
    weights: torch.Tensor

    def __attrs_post_init__(self) -> None:
        if self.target.ndim != 2 or self.sources.ndim != 3 or self.sources.shape[:2] != self.target.shape:
            raise ParameterError(
                f"Merge needs target [B, M] and sources [B, M, K], got {tuple(self.target.shape)} and "
                f"{tuple(self.sources.shape)}"
            )
        if self.weights.shape[:3] != self.sources.shape or self.weights.ndim not in (3, 4):
            raise ParameterError(
                f"Merge weights must be [B, M, K] or [B, M, K, H] matching sources {tuple(self.sources.shape)}, "
                f"got {tuple(self.weights.shape)}"
            )


@attrs.frozen(eq=False)
class LayerEdit:
    """What a policy changes in one layer before it attends (returned from ``cachepolicy_layer``).

    Attributes:
        drop: bool ``[B, S]`` (every head of the layer) or ``[H, B, S]`` (per head) over the table: tokens
            this layer stops holding. Tokens a policy protected at an earlier selection (``pinned``) and
            tokens in ``protect`` stay; protect beats drop, as at ``select``.
        protect: bool ``[B, S]`` or ``[H, B, S]``: tokens no policy may drop from this layer now.
        merge: a :class:`Merge` applied to this layer.
    """

    drop: torch.Tensor | None = None
    protect: torch.Tensor | None = None
    merge: Merge | None = None


def describe(value: Any) -> str:
    """Short description of a returned object for error messages."""
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}{'' if shape is None else list(shape)}"


@attrs.frozen(eq=False)
class RopePositions:
    """RoPE positions a policy gives one forward (returned from ``cachepolicy_rope_positions``).

    Attributes:
        resident: long ``[B, S]``: the frame position every resident key is rotated to for this call (a
            ``raw`` cache re-rotates keys on read), or None to keep their ``rope_pos``.
        own_start: the frame position of the call's first frame (its queries and own keys; later frames follow
            it), or None to keep the engine's.
    """

    resident: torch.Tensor | None = None
    own_start: int | None = None
