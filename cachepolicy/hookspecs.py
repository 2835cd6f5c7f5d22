"""Hook specifications (pluggy, project name ``cachepolicy``).

Two families of hooks exist:

*Discovery hooks* are implemented at module level by an entry-point plugin and tell the registry what
the distribution provides (policy classes, model entries). They run once, when plugins are discovered.

*Rollout hooks* are implemented as methods of :class:`cachepolicy.policy.Policy` instances. Only the
policies selected for a run are registered with that run's plugin manager, so only they take part.
The lifecycle of one rollout, per chunk ``c`` of ``frames_per_chunk`` latent frames::

    session_start
    for each chunk c:
        chunk_start
        (attempt loop)
            for each denoising step i:  model forward on the noisy chunk -> x0 prediction
                after_step            -> may return a PruneRequest (prune + restart the chunk)
            candidate_ready           -> may return a PruneRequest
        before_commit                 -> may return a replacement latent
        (context pass: the clean latent is run once more and its K/V are committed to the cache)
        select                        -> each policy returns a Selection (protect / drop)
        (the composed keep set is applied once, by compacting the cache in frame order)
        after_compaction
        chunk_end                     -> extra trace fields
    session_end

and around every model forward (each denoising step, context pass and re-encode):

    rope_positions                    -> may move the call's RoPE positions (raw-mode caches)
    layer_request                     -> may ask to see the forward inside its layers
        layer (per layer, before it attends) -> may return a LayerEdit (drop, merge)

Tokens of the chunk being generated are never part of the :class:`~cachepolicy.cache.CacheView` that
policies see during its denoising; they become context once committed, at ``select``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

PROJECT_NAME = "cachepolicy"
ENTRY_POINT_GROUP = "cachepolicy"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

if TYPE_CHECKING:  # pragma: no cover
    from cachepolicy.cache import CacheView
    from cachepolicy.chunk import Candidate, StepOutput
    from cachepolicy.engine import Session
    from cachepolicy.layers import ForwardCall, LayerContext, LayerEdit, LayerRequest, RopePositions
    from cachepolicy.metrics import Metric
    from cachepolicy.models import ModelEntry
    from cachepolicy.policy import Policy, PruneRequest, Selection
    import torch


class DiscoverySpecs:
    """Module-level hooks of an entry-point plugin."""

    @hookspec
    def cachepolicy_policies(self) -> list[type[Policy]]:
        """Return the policy classes this plugin provides (each has a unique ``name``)."""

    @hookspec
    def cachepolicy_models(self) -> list[ModelEntry]:
        """Return the model entries this plugin provides (name, adapter, lazy loader)."""

    @hookspec
    def cachepolicy_metrics(self) -> list[type[Metric]]:
        """Return the metric classes this plugin provides (used by ``cachepolicy compare``)."""


class RolloutSpecs:
    """Hooks that selected policies implement for one rollout."""

    @hookspec
    def cachepolicy_session_start(self, session: Session) -> None:
        """The rollout begins: the cache is empty, ``session.config`` and the adapter are set."""

    @hookspec
    def cachepolicy_chunk_start(self, session: Session, chunk: int) -> None:
        """Chunk ``chunk`` is about to be denoised (first attempt only)."""

    @hookspec
    def cachepolicy_after_step(self, session: Session, step: StepOutput) -> PruneRequest | None:
        """A denoising step finished; ``step.x0`` is the x0-prediction ``[B, C, F, H, W]``.

        Return a :class:`~cachepolicy.policy.PruneRequest` to prune cached tokens and restart the chunk.
        """

    @hookspec
    def cachepolicy_candidate_ready(self, session: Session, candidate: Candidate) -> PruneRequest | None:
        """The chunk's final x0 ``[B, C, F, H, W]`` is ready, before it is committed.

        Return a :class:`~cachepolicy.policy.PruneRequest` to prune cached tokens and restart the chunk.
        """

    @hookspec
    def cachepolicy_before_commit(self, session: Session, candidate: Candidate) -> torch.Tensor | None:
        """Last look before the context pass; return a replacement latent ``[B, C, F, H, W]`` or None.

        At most one policy of a composition may rewrite the latent (evaluation policies such as fault
        injection); two rewriting the same chunk raise :class:`~cachepolicy.errors.CompositionError`.
        """

    @hookspec
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection | None:
        """Say which resident tokens this policy protects and which it drops.

        ``view`` covers every resident token, the chunk just committed included. Protect beats drop.
        """

    @hookspec
    def cachepolicy_after_compaction(self, session: Session, chunk: int) -> None:
        """The composed keep set was applied; ``session.cache`` holds the context for the next chunk."""

    @hookspec
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any] | None:
        """Return extra JSON-serialisable trace fields for this chunk (merged into its trace record)."""

    @hookspec
    def cachepolicy_session_end(self, session: Session) -> None:
        """The rollout finished (or failed); release per-session resources."""

    @hookspec
    def cachepolicy_rope_positions(self, session: Session, call: ForwardCall) -> RopePositions | None:
        """Before a forward: move its RoPE positions (needs a ``raw`` cache: declare ``rope_mode = "raw"``).

        Return :class:`~cachepolicy.layers.RopePositions` (resident keys ``[B, S]`` and/or the call's own
        start frame) or None. At most one policy of a composition may move positions.
        """

    @hookspec
    def cachepolicy_layer_request(self, session: Session, call: ForwardCall) -> LayerRequest | None:
        """Before a forward: return a :class:`~cachepolicy.layers.LayerRequest` to get ``cachepolicy_layer``
        inside its layers. Forwards that no policy requests run the plain per-layer path."""

    @hookspec
    def cachepolicy_layer(self, session: Session, layer: LayerContext) -> LayerEdit | None:
        """Inside one layer of a requested forward (conditional branch), before it attends: the call's
        queries, keys and values and the layer's resident cache. Return a
        :class:`~cachepolicy.layers.LayerEdit` (applied to every branch) or None."""


ROLLOUT_HOOKS: tuple[str, ...] = tuple(
    name for name in vars(RolloutSpecs) if name.startswith("cachepolicy_")
)
DISCOVERY_HOOKS: tuple[str, ...] = tuple(
    name for name in vars(DiscoverySpecs) if name.startswith("cachepolicy_")
)
