"""``forcing-kv``: head-role-aware KV cache (Forcing-KV, arXiv 2605.09681; official code zju-jiyicheng/Forcing-KV
@50ac1f45, ``wan/modules/causal_model_forcingkv.py``). ``docs/policies/forcing-kv.md`` has the faithfulness table.

Heads are split offline into *static* heads (attention on the current chunk and the frame just before it) and
*dynamic* heads (inter-frame motion), read from a head-role file in the reference repository's JSON format
(:func:`read_head_roles`; ``cachepolicy calibrate`` writes one, :mod:`cachepolicy.calibrate`). Per chunk ``c`` of
``F`` latent frames (first frame ``s = c * F``, newest committed frame ``s + F - 1``), at ``select`` after its
context pass (the only pass whose keys and values become resident, as in the reference's ``update_cache``):

1. Warm-up, chunks ``0 .. ar_start``: every layer and head keeps the sink (frame 0) and the newest frame.
2. From chunk ``ar_start + 1`` on, in every layer but layer 0 (never split): static heads keep the sink and the
   newest frame (the anchor); dynamic heads keep the sink, the newest frame and the ``k = round(F * n * retention)``
   most changing of the ``F * n`` key *segments* of frames ``s - 1 .. s + F - 2`` (``n = segments`` contiguous
   raster ranges of ``tokens_per_frame / n`` tokens per frame). A segment's score is the mean over its tokens of
   the cosine similarity between a token's key in frame ``t`` and in frame ``t + 1`` (each key the concatenation
   over the layer's dynamic heads of the post-RoPE keys, :func:`segment_scores`); the ``k`` lowest scores of all
   ``F * n`` are kept (:func:`bottom_segments`). The selection is computed in the first split layer that has
   dynamic heads (layer 1 in the reference) and reused by every later layer, each keeping its own K/V of the
   selected segments. What was selected at the previous chunk is dropped (the reference overwrites its dynamic
   buffer).

Decisions are per sample (the reference scores batch element 0 and applies its choice to the whole batch), so a
batched run equals each sample run alone. Eviction is deletion at absolute RoPE positions (no re-rotation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from cachepolicy.errors import CompositionError, ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import CacheBound, Policy, Selection, finite_float, non_negative_int, positive_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.cache import CacheView, KVCache
    from cachepolicy.engine import Session
    from cachepolicy.models import ModelInfo

#: the keys the reference's loader (``_load_offline_head_groups``) reads a layer's static / dynamic heads from
STATIC_KEYS = ("static_head", "static_heads", "local_head", "local_heads", "spatial_head", "spatial_heads")
DYNAMIC_KEYS = ("dynamic_head", "dynamic_heads", "temporal_head", "temporal_heads")


# --------------------------------------------------------------------------------------------------
# Head-role files
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class HeadRoles:
    """Static and dynamic heads per layer (sorted head indices; every head of a layer in exactly one).

    Attributes:
        static: per layer, its static heads.
        dynamic: per layer, its dynamic heads.
        source: where the roles came from (a path), for messages.
    """

    static: tuple[tuple[int, ...], ...]
    dynamic: tuple[tuple[int, ...], ...]
    source: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.static)

    @property
    def num_heads(self) -> int:
        return len(self.static[0]) + len(self.dynamic[0]) if self.static else 0

    def counts(self) -> tuple[int, int]:
        """(static, dynamic) heads over every layer."""
        return sum(map(len, self.static)), sum(map(len, self.dynamic))


def _heads(item: dict[str, Any], keys: Sequence[str], what: str, layer: int, num_heads: int) -> list[int]:
    heads: list[int] = []
    for key in keys:
        value = item.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in value):
            raise ParameterError(f"{what}: layer {layer} {key!r} must be a list of head indices, got {value!r}")
        heads.extend(value)
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad:
        raise ParameterError(f"{what}: layer {layer} names heads {bad}; the model has heads 0..{num_heads - 1}")
    return heads


def _file_size(items: list[tuple[int, Any]]) -> tuple[int, int]:
    """(layers, heads) the entries of a role file imply: the largest layer index and head index, plus one."""
    layers = heads = 0
    for position, item in items:
        if not isinstance(item, dict):
            continue
        index = item.get("layer_idx", position)
        if isinstance(index, int):
            layers = max(layers, index + 1)
        for key in (*STATIC_KEYS, *DYNAMIC_KEYS):
            value = item.get(key)
            if isinstance(value, list):
                heads = max([heads, *(h + 1 for h in value if isinstance(h, int))])
    return layers, heads


def parse_head_roles(payload: Any, num_layers: int, num_heads: int, *, source: str = "head roles") -> HeadRoles:
    """Head roles from the reference's JSON structure, checked against a model of ``num_layers`` x ``num_heads``.

    Accepted (as the reference's loader): ``{"layers": [...]}``, ``{"layers": {"<index>": {...}}}`` or a bare list
    of layer entries; an entry is ``{"layer_idx": i, "static_head": [...], "dynamic_head": [...]}`` (the keys of
    :data:`STATIC_KEYS` / :data:`DYNAMIC_KEYS` also count; ``layer_idx`` defaults to the entry's position).
    Stricter than the reference: ``num_layers`` / ``num_heads`` given in the file must match the model, every
    layer from 1 on must be listed (layer 0 is never split; its entry, if any, is checked and ignored) and each
    listed layer must name every head exactly once. Raises :class:`~cachepolicy.errors.ParameterError`.
    """
    what = f"head roles {source}"
    if isinstance(payload, dict):
        for key, have in (("num_layers", num_layers), ("num_heads", num_heads)):
            if key in payload and payload[key] != have:
                raise ParameterError(
                    f"{what} are for a model of {payload.get('num_layers', '?')} layers x "
                    f"{payload.get('num_heads', '?')} heads; this model has {num_layers} layers x {num_heads} heads "
                    f"(make roles for it with 'cachepolicy calibrate')")
        layers = payload.get("layers")
    else:
        layers = payload
    if isinstance(layers, dict):
        try:
            items = [(int(key), item) for key, item in layers.items()]
        except ValueError:
            raise ParameterError(f"{what}: 'layers' keys must be layer indices, got {sorted(layers)}") from None
    elif isinstance(layers, list):
        items = list(enumerate(layers))
    else:
        raise ParameterError(f"{what}: expected {{'layers': [{{'layer_idx', 'static_head', 'dynamic_head'}}, ...]}} "
                             f"(the Forcing-KV head file format), got {type(layers).__name__}")
    file_layers, file_heads = _file_size(items)
    if file_layers > num_layers or file_heads > num_heads:  # e.g. the reference's Krea-14B list (no counts)
        raise ParameterError(
            f"{what} are for a model of at least {file_layers} layers x {file_heads} heads; this model has "
            f"{num_layers} layers x {num_heads} heads (make roles for it with 'cachepolicy calibrate')")
    static: dict[int, tuple[int, ...]] = {}
    dynamic: dict[int, tuple[int, ...]] = {}
    for position, item in items:
        if not isinstance(item, dict):
            raise ParameterError(f"{what}: layer entry {position} must be an object, got {item!r}")
        layer = item.get("layer_idx", position)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < num_layers:
            raise ParameterError(f"{what}: layer_idx {layer!r} is not a layer of this model (0..{num_layers - 1})")
        if layer in static:
            raise ParameterError(f"{what}: layer {layer} is listed twice")
        s = _heads(item, STATIC_KEYS, what, layer, num_heads)
        d = _heads(item, DYNAMIC_KEYS, what, layer, num_heads)
        if sorted(s + d) != list(range(num_heads)):
            raise ParameterError(f"{what}: layer {layer} must name every head 0..{num_heads - 1} exactly once as "
                                 f"static or dynamic, got static {sorted(s)} and dynamic {sorted(d)}")
        static[layer], dynamic[layer] = tuple(sorted(s)), tuple(sorted(d))
    missing = [layer for layer in range(1, num_layers) if layer not in static]
    if missing:
        raise ParameterError(f"{what} do not list layer(s) {missing}; every layer from 1 to {num_layers - 1} needs "
                             f"its static and dynamic heads")
    static.setdefault(0, tuple(range(num_heads)))  # layer 0 is never split: all static in effect
    dynamic.setdefault(0, ())
    return HeadRoles(static=tuple(static[layer] for layer in range(num_layers)),
                     dynamic=tuple(dynamic[layer] for layer in range(num_layers)), source=source)


def read_head_roles(path: str | Path, num_layers: int, num_heads: int) -> HeadRoles:
    """:func:`parse_head_roles` of the JSON file ``path``; a missing or unreadable file raises
    :class:`~cachepolicy.errors.ParameterError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"forcing-kv: roles={str(path)!r} is not a file; give a head-role JSON (the "
                             f"reference's configs_head format, or one written by 'cachepolicy calibrate')")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ParameterError(f"forcing-kv: roles file {str(path)!r} is not readable JSON: {exc}") from None
    return parse_head_roles(payload, num_layers, num_heads, source=str(path))


# --------------------------------------------------------------------------------------------------
# Segment selection (pure functions)
# --------------------------------------------------------------------------------------------------


def segment_scores(keys: torch.Tensor, segments: int) -> torch.Tensor:
    """Paper Eq. 3 / reference ``dynamic_compression``: per candidate frame ``t`` and segment ``j``, the mean over
    the segment's tokens of ``cos(k[t, j, tau], k[t + 1, j, tau])``.

    Args:
        keys: ``[B, T + 1, N, H_d, D]`` post-RoPE keys of ``T`` candidate frames and the boundary frame after them
            (``N`` tokens per frame in raster order, ``H_d`` dynamic heads); a token's vector is its keys
            concatenated over the heads (``H_d * D`` values).
        segments: ``n``, contiguous raster ranges per frame (``N`` divisible by ``n``).

    Returns:
        float32 ``[B, T, n]`` mean cosine similarities (``torch.nn.functional.cosine_similarity``, eps 1e-8).
    """
    import torch.nn.functional as F

    batch, frames, tokens = keys.shape[:3]
    x = keys.float().reshape(batch, frames, segments, tokens // segments, -1)
    return F.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1).mean(dim=-1)


def bottom_segments(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` lowest of all ``T * n`` scores per sample (``torch.topk(largest=False)`` over the flattened
    ``[T, n]``, as the reference: not per frame), as sorted flat indices ``t * n + j``: long ``[B, keep]``."""
    import torch

    flat = scores.flatten(1)
    if keep <= 0:
        return torch.empty(flat.shape[0], 0, dtype=torch.long, device=flat.device)
    return torch.topk(flat, k=keep, dim=-1, largest=False).indices.sort(dim=-1).values


def kept_segments(frames: int, segments: int, retention: float) -> int:
    """``round(frames * segments * retention)`` (Python's rounding, as the reference), within ``[0, frames * n]``."""
    total = frames * segments
    return max(0, min(total, int(round(total * retention))))


def frame_keys(cache: KVCache, view: CacheView, layer: int, heads: Sequence[int], first_frame: int,
               num_frames: int, tokens_per_frame: int) -> torch.Tensor:
    """Post-RoPE resident keys of ``heads`` of ``layer`` (branch 0) for frames ``first_frame ..
    first_frame + num_frames - 1``: float32 ``[B, num_frames, tokens_per_frame, len(heads), D]`` in raster order.

    Raises :class:`~cachepolicy.errors.CompositionError` if a head does not hold every token of those frames
    (another policy dropped some)."""
    import torch

    batch = view.batch_size
    out = torch.zeros(batch, num_frames * tokens_per_frame, len(heads), cache.head_dim, dtype=torch.float32,
                      device=cache.device)
    found = torch.zeros(batch, num_frames * tokens_per_frame, len(heads), dtype=torch.bool, device=cache.device)
    wanted = {head: i for i, head in enumerate(heads)}
    for cell in cache.layer_cells(layer):
        local = [i for i, head in enumerate(cell.heads) if head in wanted]
        if not local:
            continue
        targets = [wanted[cell.heads[i]] for i in local]
        width = cell.residency.max_length
        if not width:
            continue
        index = cell.residency.slots[:, :width].clamp(0, max(view.size - 1, 0))
        keys = cell.k[:, :width]
        if cache.rope_mode == "raw":  # stored before RoPE: rotate at their positions
            keys = cache.rotary.rotate(keys, *cache.rotary.tables(view.rope_pos.gather(1, index),
                                                                  view.row.gather(1, index), view.col.gather(1, index)))
        relative = view.frame.gather(1, index) - first_frame
        hit = cell.residency.valid(width) & (relative >= 0) & (relative < num_frames)
        position = relative * tokens_per_frame + view.spatial_index.gather(1, index)
        for b in range(batch):
            rows = hit[b].nonzero().squeeze(1)
            picked = keys[b, rows][:, local].float()  # [R, H_local, D]
            for j, target in enumerate(targets):
                out[b, position[b, rows], target] = picked[:, j]
                found[b, position[b, rows], target] = True
    if not bool(found.all()):
        raise CompositionError(f"forcing-kv scores key segments of frames {first_frame}..{first_frame + num_frames - 1} "
                               f"in layer {layer}, but some of its dynamic heads no longer hold all of their tokens: "
                               f"another composed policy dropped them")
    return out.view(batch, num_frames, tokens_per_frame, len(heads), cache.head_dim)


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


def _roles_path(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(f"forcing-kv: roles={value!r} is not allowed; it must be the path of a head-role JSON "
                             f"file (the reference's configs_head format; 'cachepolicy calibrate' writes one)")


@attrs.frozen
class ForcingKV(Policy):
    """Static heads keep the sink and the anchor frame; dynamic heads also keep the most changing key segments.

    Attributes:
        roles: path of the head-role JSON (static / dynamic heads per layer, the reference's format).
        ar_start: the last warm-up chunk (0-based); head groups split after its context pass.
        segments: segments per frame ``n`` (contiguous raster ranges; must divide the tokens per frame).
        retention: fraction ``r`` of the ``F * n`` candidate segments the dynamic heads keep,
            ``k = round(F * n * r)``.
    """

    name: ClassVar[str] = "forcing-kv"
    summary: ClassVar[str] = "static heads: sink + anchor frame; dynamic heads: + most changing key segments"

    roles: str = attrs.field(validator=_roles_path)
    ar_start: int = attrs.field(default=1, validator=non_negative_int)
    segments: int = attrs.field(default=6, validator=positive_int)
    retention: float = attrs.field(default=0.33, validator=finite_float(0.0, 1.0))

    def check_compatible(self, model: ModelInfo) -> None:
        read_head_roles(self.roles, model.num_layers, model.num_heads)
        tokens = model.tokens_per_frame
        if tokens % self.segments:
            divisors = [d for d in range(1, tokens + 1) if tokens % d == 0]
            shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
            raise ParameterError(f"forcing-kv: segments={self.segments} does not divide the model's {tokens} tokens per "
                                 f"frame; choose a divisor ({shown})")

    def cache_bound(self, model: ModelInfo) -> CacheBound:
        """At most the sink, the segments' ``F`` candidate frames and the anchor."""
        return CacheBound(kept_frames=model.frames_per_chunk + 2)

    def new_state(self) -> dict[str, Any]:
        return {"roles": None, "scores": {}, "kept": {}}

    @hookimpl
    def cachepolicy_session_start(self, session: Session) -> None:
        info = session.model
        self.state(session)["roles"] = read_head_roles(self.roles, info.num_layers, info.num_heads)

    def scoring_layer(self, roles: HeadRoles) -> int | None:
        """The first split layer with dynamic heads (layer 1 for the reference's files), or None."""
        return next((layer for layer in range(1, roles.num_layers) if roles.dynamic[layer]), None)

    @hookimpl
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection:
        import torch

        info = session.model
        state = self.state(session)
        frames, tokens = info.frames_per_chunk, info.tokens_per_frame
        chunk = session.chunk
        newest = (chunk + 1) * frames - 1
        base = view.valid & ((view.frame == 0) | (view.frame == newest))
        roles: HeadRoles = state["roles"]
        layer = self.scoring_layer(roles)
        if chunk <= self.ar_start or layer is None:
            return Selection(drop=view.valid & ~base)
        first = chunk * frames - 1  # the anchor frame s - 1, then the chunk's frames up to s + F - 2
        keys = frame_keys(session.cache, view, layer, roles.dynamic[layer], first, frames + 1, tokens)
        scores = segment_scores(keys, self.segments)  # [B, F, n]
        chosen = bottom_segments(scores, kept_segments(frames, self.segments, self.retention))  # [B, k]
        per_segment = tokens // self.segments
        segment_of = (view.frame - first) * self.segments + view.spatial_index // per_segment  # [B, S]
        in_range = (view.frame >= first) & (view.frame < first + frames)
        selected = torch.zeros(view.batch_size, frames * self.segments + 1, dtype=torch.bool, device=view.valid.device)
        selected.scatter_(1, chosen.to(selected.device), True)
        dynamic = view.valid & in_range & selected.gather(1, segment_of.clamp(0, frames * self.segments).masked_fill(
            ~in_range, frames * self.segments))
        keep = base.expand(info.num_layers, info.num_heads, *base.shape).clone()
        for index in range(1, info.num_layers):
            if roles.dynamic[index]:
                keep[index, list(roles.dynamic[index])] |= dynamic
        state["scores"][chunk] = scores.detach().cpu()
        state["kept"][chunk] = chosen.detach().cpu()
        return Selection(drop=view.valid & ~keep)

    @hookimpl
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any] | None:
        chosen = self.state(session)["kept"].get(chunk)
        if chosen is None:
            return None
        frames = session.model.frames_per_chunk
        first = chunk * frames - 1
        return {"forcing_kv_segments": [[[first + int(i) // self.segments, int(i) % self.segments] for i in sample]
                                        for sample in chosen.tolist()]}


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [ForcingKV]
