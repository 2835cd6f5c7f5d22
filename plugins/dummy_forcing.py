"""``dummy-forcing``: one-time online head classification into three cache groups (Dummy Forcing, arXiv
2601.20499; official code csguoh/DummyForcing @28128ed6, ``wan/modules/dummyforcing.py`` and
``wan/modules/causal_model.py``). ``docs/policies/dummy-forcing.md`` has the faithfulness table.

Per chunk ``c`` of ``F`` latent frames (first frame ``s = c * F``), at ``select`` after its context pass:

1. Warm-up, chunks ``0 .. ar_start - 1``: every head keeps the sink (frame 0) and the last ``local_chunks``
   chunks.
2. Classification, in the context pass of chunk ``ar_start``, inside every layer before it attends
   (:func:`frame_masses`): ``R`` query rows of the chunk (post-RoPE) are taken, per layer, from a file
   (``rows_file``) or from the policy's own generator seeded with ``seed``; per head, the softmax attention of
   those rows over the keys it attends to ([sink ; local ; the chunk itself]) is summed over the sink frame
   (``p_first``), the other resident frames (``p_mid``) and the chunk's own keys (``p_last``), and averaged over
   the rows. Then over all ``L x H`` heads at once (:func:`assign_groups`): ``p0n = p_first / sum(p_first)``,
   ``p1n = p_mid / sum(p_mid)``, ``cost = max(p0n, p1n)``; the ``round(dummy * L * H)`` heads of lowest cost are
   *dummy*, of the others those with ``p0n < p1n`` are *mid*, the rest *first*.
3. From chunk ``ar_start`` on: *first* heads keep only the sink frame, *dummy* heads only the newest frame
   (refreshed every chunk), *mid* heads the last ``local_chunks`` chunks. Each group is its own head group of the
   cache, attended by its own attention call over only what it holds.

Decisions are per sample (the reference classifies batch element 0 for the whole batch); the sampled rows are
the same for every sample. Eviction is deletion at absolute RoPE positions (no re-rotation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from cachepolicy.errors import ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerRequest
from cachepolicy.policy import CacheBound, Policy, Selection, finite_float, non_negative_int, positive_int

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.cache import CacheView
    from cachepolicy.engine import Session
    from cachepolicy.layers import ForwardCall, LayerContext
    from cachepolicy.models import ModelInfo

#: group names, in the order of :func:`assign_groups`' codes 0, 1, 2
GROUPS = ("first", "mid", "dummy")


# --------------------------------------------------------------------------------------------------
# Classification (pure functions)
# --------------------------------------------------------------------------------------------------


def frame_masses(resident: torch.Tensor, own: torch.Tensor, is_sink: torch.Tensor) -> torch.Tensor:
    """Reference ``online_head_classification``: a layer's attention mass per head on the sink, the other resident
    keys and the call's own keys.

    Args:
        resident: float32 ``[B, H, S]`` softmax mass per resident key averaged over the sampled rows
            (:meth:`~cachepolicy.layers.LayerContext.attention_mass`; 0 for keys a head does not hold).
        own: float32 ``[B, H, n]`` the same over the call's own keys.
        is_sink: bool ``[B, S]``: resident keys of the sink frame.

    Returns:
        float32 ``[B, H, 3]``: ``(p_first, p_mid, p_last)``.
    """
    import torch

    sink = is_sink.unsqueeze(1).to(resident.dtype)
    first = (resident * sink).sum(dim=-1)
    mid = (resident * (1.0 - sink)).sum(dim=-1)
    return torch.stack([first, mid, own.sum(dim=-1)], dim=-1)


def assign_groups(probs: torch.Tensor, num_dummy: int) -> torch.Tensor:
    """Reference ``dynamic_head_programming`` for one sample: the global ranking over every layer and head.

    Args:
        probs: float32 ``[L, H, 3]`` ``(p_first, p_mid, p_last)`` per layer and head.
        num_dummy: heads made dummy (the lowest ``cost``).

    Returns:
        long ``[L, H]``: 0 first, 1 mid, 2 dummy (:data:`GROUPS`).
    """
    import torch

    layers, heads, _ = probs.shape
    p0 = probs[..., 0].reshape(-1)
    p1 = probs[..., 1].reshape(-1)
    p0n, p1n = p0 / p0.sum(), p1 / p1.sum()
    cost = torch.maximum(p0n, p1n)
    order = torch.argsort(cost)
    groups = torch.where(p0n < p1n, 1, 0)
    groups[order[:num_dummy]] = 2
    return groups.view(layers, heads)


def read_rows(path: str | Path, num_layers: int, num_tokens: int) -> torch.Tensor:
    """Query rows from a JSON file: a list of ``L`` lists of row indices (or ``{"rows": [...]}``), one list per
    layer in layer order, each index in ``[0, num_tokens)`` (the chunk's tokens, frame-major raster order).
    Returns long ``[L, R]``; raises :class:`~cachepolicy.errors.ParameterError` naming the file and the problem."""
    import torch

    path = Path(path)
    what = f"dummy-forcing: rows_file={str(path)!r}"
    if not path.is_file():
        raise ParameterError(f"{what} is not a file; give a JSON list of {num_layers} lists of query-row indices")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ParameterError(f"{what} is not readable JSON: {exc}") from None
    rows = payload.get("rows") if isinstance(payload, dict) else payload
    if (not isinstance(rows, list) or len(rows) != num_layers or not all(isinstance(r, list) and r for r in rows)
            or len({len(r) for r in rows}) != 1):
        raise ParameterError(f"{what} must hold {num_layers} non-empty lists of equal length (one per layer), "
                             f"got {str(rows)[:80]}")
    flat = [i for r in rows for i in r]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_tokens for i in flat):
        bad = next(i for i in flat if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_tokens))
        raise ParameterError(f"{what} holds row {bad!r}; rows index the chunk's {num_tokens} query tokens "
                             f"(0..{num_tokens - 1})")
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


def _optional_path(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise ParameterError(f"dummy-forcing: rows_file={value!r} is not allowed; it must be a path, or empty to "
                             f"sample the rows with the policy's generator")


@attrs.frozen
class DummyForcing(Policy):
    """Classify heads once (first / mid / dummy) and give each group its own cache.

    Attributes:
        ar_start: the chunk (0-based, at least 1) whose context pass classifies the heads.
        local_chunks: chunks kept by the warm-up's local window and by *mid* heads (``L``).
        dummy: fraction of all ``L x H`` heads made dummy (``round(dummy * L * H)`` heads).
        rows: query rows sampled per layer for the classification (0: ``tokens_per_frame // 3``, the
            reference's count).
        seed: seed of the policy's own generator for the rows.
        rows_file: JSON file with the rows per layer instead (empty: sample them).
    """

    name: ClassVar[str] = "dummy-forcing"
    summary: ClassVar[str] = "online head classification: sink-only, one-frame (dummy) and local head groups"

    ar_start: int = attrs.field(default=1, validator=positive_int)
    local_chunks: int = attrs.field(default=1, validator=positive_int)
    dummy: float = attrs.field(default=0.5, validator=finite_float(0.0, 1.0))
    rows: int = attrs.field(default=0, validator=non_negative_int)
    seed: int = attrs.field(default=0, validator=non_negative_int)
    rows_file: str = attrs.field(default="", validator=_optional_path)

    def num_rows(self, model: ModelInfo) -> int:
        return self.rows or max(1, model.tokens_per_frame // 3)

    def num_dummy(self, model: ModelInfo) -> int:
        return int(round(self.dummy * model.num_layers * model.num_heads))

    def query_rows(self, model: ModelInfo) -> torch.Tensor:
        """long ``[L, R]``: the rows each layer samples (from ``rows_file``, else the seeded generator: one
        ``randint(0, n, (R,))`` per layer in layer order, ``n`` the chunk's tokens)."""
        import torch

        tokens = model.frames_per_chunk * model.tokens_per_frame
        if self.rows_file:
            return read_rows(self.rows_file, model.num_layers, tokens)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        return torch.stack([torch.randint(0, tokens, (self.num_rows(model),), generator=generator)
                            for _ in range(model.num_layers)])

    def check_compatible(self, model: ModelInfo) -> None:
        self.query_rows(model)  # a bad rows file fails here, before anything runs

    def cache_bound(self, model: ModelInfo) -> CacheBound:
        """The sink and the last ``local_chunks`` chunks at most."""
        return CacheBound(kept_frames=self.local_chunks * model.frames_per_chunk + 1)

    def new_state(self) -> dict[str, Any]:
        return {"rows": None, "masses": {}, "groups": None}

    @hookimpl
    def cachepolicy_session_start(self, session: Session) -> None:
        self.state(session)["rows"] = self.query_rows(session.model)

    @hookimpl
    def cachepolicy_layer_request(self, session: Session, call: ForwardCall) -> LayerRequest | None:
        return LayerRequest() if call.context and call.chunk == self.ar_start else None

    @hookimpl
    def cachepolicy_layer(self, session: Session, layer: LayerContext) -> None:
        state = self.state(session)
        rows = state["rows"][layer.index].to(layer.query.device)
        mass = layer.attention_mass(layer.query[:, rows])
        state["masses"][layer.index] = frame_masses(mass.resident, mass.own, layer.view.frame == 0).cpu()

    @hookimpl
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection:
        import torch

        info = session.model
        state = self.state(session)
        chunk, frames = session.chunk, info.frames_per_chunk
        newest = (chunk + 1) * frames - 1
        local = view.valid & (view.frame > newest - self.local_chunks * frames)
        sink = view.valid & (view.frame == 0)
        if chunk < self.ar_start:
            return Selection(drop=view.valid & ~(sink | local))
        if chunk == self.ar_start:
            missing = [layer for layer in range(info.num_layers) if layer not in state["masses"]]
            if missing:
                raise ParameterError(f"dummy-forcing: no attention masses for layers {missing} at the context pass "
                                     f"of chunk {chunk}")
            probs = torch.stack([state["masses"][layer] for layer in range(info.num_layers)], dim=1)  # [B, L, H, 3]
            state["probs"] = probs
            state["groups"] = torch.stack([assign_groups(p, self.num_dummy(info)) for p in probs])  # [B, L, H]
        groups = state["groups"].permute(1, 2, 0).to(view.valid.device)[..., None]  # [L, H, B, 1]
        newest_frame = view.valid & (view.frame == newest)
        keep = torch.where(groups == 0, sink, torch.where(groups == 1, local, newest_frame))
        return Selection(drop=view.valid & ~keep)

    @hookimpl
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any] | None:
        if chunk != self.ar_start:
            return None
        groups = self.state(session)["groups"]
        return {"dummy_forcing_groups": [
            [{name: [h for h in range(layer.shape[0]) if int(layer[h]) == code] for code, name in enumerate(GROUPS)}
             for layer in sample] for sample in groups]}


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [DummyForcing]
