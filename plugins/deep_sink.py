"""``deep-sink``: a deep attention sink whose temporal RoPE phase follows the timeline (Deep Forcing's Deep
Sink; Yi, Jang, Cho, Nam, Yoon, Kim, arXiv 2512.05081). Docs: ``docs/policies/deep-sink.md``.

The first ``frames`` latent frames (S) are never evicted (protect beats drop, as ``attention-sink``). Once the
context has lost tokens (a window evicts), the sink's keys are re-rotated along the temporal RoPE axis only,
before the first forward of every chunk, so that the sink sits just behind the frames the chunk attends to.
With ``L`` the tokens the chunk's first call attends to (resident tokens plus the chunk's own, ``F`` frames
of ``n`` tokens), ``S_t`` the sink's resident tokens and ``s`` the chunk's first frame, the sink's new first
frame is (the reference code's arithmetic, ``placement=code``)::

    sigma = s - (L - S_t) // n - S_t // n            (= s - L / n for whole frames)

which leaves a gap of one chunk between the sink and the tail: the chunk's own frames are counted in the
tail as if it ended at ``s - 1``. The rotation is ``delta = sigma - base`` frames, ``base`` the previous
``sigma``; the first time it is ``first_delta`` (0 here, as the reference's path without Participative
Compression; ``deep-forcing`` uses ``W - N``) and ``base`` becomes ``sigma`` all the same.
``placement=contiguous`` is the paper's reading (Eq. 5-6: the sink's last frame right before the tail's first,
the tail ending at the chunk's last frame): ``sigma = s + F - L / n`` and ``delta = sigma - position``.

Keys are rotated in place in every layer, head and branch (:meth:`KVCache.shift_frames`, exactly RoPE at the
new positions up to rounding) and their ``rope_pos`` moves with them; values are untouched. The paper's
SF+DS ablation (window ``W`` frames including the chunk) is
``deep-sink:frames=S+sliding-window:frames=W-S-F``.

The alignment arithmetic (:func:`sink_start`, :class:`SinkAlignment`) is shared with ``deep-forcing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from cachepolicy.errors import CompositionError, ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import CacheBound, Policy, Selection, positive_int

if TYPE_CHECKING:  # pragma: no cover
    from cachepolicy.cache import CacheView
    from cachepolicy.engine import Session
    from cachepolicy.models import ModelInfo

#: where the re-aligned sink goes (see the module docstring)
PLACEMENTS = ("code", "contiguous")


def _placement(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in PLACEMENTS:
        raise ParameterError(f"{type(instance).name}: {attribute.name}={value!r} is not allowed; choose one of "
                             f"{', '.join(PLACEMENTS)}")


def sink_start(frame_start: int, attended: int, sink_tokens: int, tokens_per_frame: int, frames_per_chunk: int,
               placement: str) -> int:
    """The frame the re-aligned sink starts at.

    Args:
        frame_start: ``s``, the chunk's first absolute latent frame.
        attended: ``L``, tokens the chunk's first call attends to (resident after its edits + its own).
        sink_tokens: ``S_t``, the sink's resident tokens (all of them: ``S * n``).
        tokens_per_frame: ``n``.
        frames_per_chunk: ``F``.
        placement: ``code`` (the reference: ``s - (L - S_t) // n - S_t // n``) or ``contiguous`` (``F`` frames
            later: the tail laid out to end at the chunk's last frame).
    """
    sigma = frame_start - (attended - sink_tokens) // tokens_per_frame - sink_tokens // tokens_per_frame
    return sigma + frames_per_chunk if placement == "contiguous" else sigma


class SinkAlignment:
    """Per-sample re-alignment state of a deep sink (in ``session.policy_state``).

    Attributes:
        base: per sample, the reference's ``sink_base_abs_start_frame`` (the last ``sigma``), None before the
            first re-alignment.
        position: per sample, the frame the sink's first frame is rotated to now (0 until re-aligned).
        shifts: per sample, the shift (frames) applied at the current chunk (0 when none).
    """

    def __init__(self) -> None:
        self.base: list[int | None] = []
        self.position: list[int] = []
        self.shifts: list[int] = []

    def begin_chunk(self, batch_size: int) -> None:
        """Start a chunk: no shift yet (sizes the per-sample lists on first use)."""
        if not self.position:
            self.base = [None] * batch_size
            self.position = [0] * batch_size
        self.shifts = [0] * batch_size

    def realign(self, session: Session, sink_frames: int, sigmas: list[int | None], first_delta: int,
                placement: str) -> list[int]:
        """Rotate each sample's sink so that it starts at ``sigmas[b]`` (None: leave sample ``b``); returns the
        shifts (frames). ``placement=code`` rotates by ``sigma - base`` (the first time by ``first_delta``) and
        sets ``base = sigma``; ``contiguous`` rotates by ``sigma - position``."""
        import torch

        deltas = []
        for b, sigma in enumerate(sigmas):
            if sigma is None:
                deltas.append(0)
                continue
            if placement == "code":
                delta = first_delta if self.base[b] is None else sigma - self.base[b]
                self.base[b] = sigma
            else:
                delta = sigma - self.position[b]
            self.position[b] += delta
            self.shifts[b] += delta
            deltas.append(delta)
        if any(deltas):
            view = session.cache.view()
            per_sample = torch.tensor(deltas, dtype=torch.long, device=view.frame.device).unsqueeze(1)
            sink = view.valid & (view.frame < sink_frames)
            session.cache.shift_frames(torch.where(sink, per_sample, torch.zeros_like(view.frame)))
        return deltas


def refuse_raw_cache(session: Session, name: str) -> None:
    """A sink re-rotated in place needs keys stored after RoPE: refuse a cache that places them per call."""
    if session.cache.rope_mode != "absolute":
        raise CompositionError(
            f"{name} re-rotates cached keys in place, but this rollout's cache stores keys before RoPE "
            f"(rope_mode={session.cache.rope_mode!r}, set by a policy or recipe that places positions per call, "
            f"e.g. infinity-rope or rolling-forcing): compose at most one of them"
        )


@attrs.frozen
class DeepSink(Policy):
    """Protect the first ``frames`` latent frames and keep their temporal RoPE phase next to the frames attended.

    Attributes:
        frames: sink size S in latent frames (the paper: 10, about half of Self Forcing's 21-frame window).
        placement: ``code`` (the reference code's arithmetic, one chunk before contiguous) or ``contiguous``
            (the paper's Eq. 5-6 read as adjacency).
    """

    name: ClassVar[str] = "deep-sink"
    summary: ClassVar[str] = "a deep sink whose temporal RoPE phase follows the timeline (Deep Forcing)"

    frames: int = attrs.field(default=10, validator=positive_int)
    placement: Literal["code", "contiguous"] = attrs.field(default="code", validator=_placement)

    def cache_bound(self, model: ModelInfo) -> CacheBound:
        return CacheBound(protected_frames=self.frames)

    def new_state(self) -> SinkAlignment:
        return SinkAlignment()

    @hookimpl
    def cachepolicy_session_start(self, session: Session) -> None:
        refuse_raw_cache(session, self.name)
        for policy in session.policies:
            if policy is not self and hasattr(policy, "compresses_in_layers"):
                raise CompositionError(
                    f"{self.name} cannot be composed with {policy.name}: it places its sink before a chunk from "
                    f"the cache as it is, while {policy.name} compresses inside the layers at the chunk's first "
                    f"call; deep-forcing is both, with the sink re-aligned after its own compression"
                )

    @hookimpl
    def cachepolicy_chunk_start(self, session: Session, chunk: int) -> None:
        """Once the context has lost tokens, re-align the sink before the chunk's first forward."""
        info = session.model
        n, frames = info.tokens_per_frame, info.frames_per_chunk
        state: SinkAlignment = self.state(session)
        state.begin_chunk(session.batch_size)
        view = session.cache.view()
        frame_start = chunk * frames
        sink_tokens = (view.valid & (view.frame < self.frames)).sum(dim=1).tolist()
        sigmas: list[int | None] = []
        for b, length in enumerate(session.cache.lengths):
            if length >= frame_start * n:  # nothing evicted yet: the sink sits where it was generated
                sigmas.append(None)
                continue
            sigmas.append(sink_start(frame_start, length + frames * n, int(sink_tokens[b]), n, frames,
                                     self.placement))
        state.realign(session, self.frames, sigmas, 0, self.placement)

    @hookimpl
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection:
        return Selection(protect=view.valid & (view.frame < self.frames))

    @hookimpl
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any]:
        state: SinkAlignment = self.state(session)
        return {"sink_shift": list(state.shifts), "sink_start": list(state.position)}


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [DeepSink]
