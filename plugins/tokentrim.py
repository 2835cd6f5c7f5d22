"""``tokentrim``: drift-triggered hard pruning of the KV cache (TokenTrim; Shaulov, Shaar, Edenzon, Wolf,
arXiv 2602.00268, 2026). There is no official code; the paper is the specification (``docs/faithfulness.md``
maps every step below to the paper and records each choice the paper leaves open).

Per chunk ``t`` (``F`` latent frames) and per sample, independently:

1. Latent summary ``Z_t = mean over the chunk's F frames of adapter.token_grid(x0)``: ``[N, D]`` with ``N``
   the cache's spatial tokens per frame (row-major ``row * token_cols + col``, the cache's
   ``spatial_index``) and ``D`` the values of one token's patch (``C * p_h * p_w``; 64 for Wan2.1).
   The candidate's ``x0`` is the x0-prediction after the first denoising step (``summary_at=first_step``,
   default) or the final x0 (``summary_at=final``). ``Z_{t-1}`` is always the summary of the accepted
   previous chunk as committed (the latent that entered the video and whose K/V are cached).
2. Drift ``d_i = ||Z_t(i) - Z_{t-1}(i)||_2`` per spatial token (float32).
3. Unstable set ``S_t``: the ``k = ceil(p * N)`` tokens of largest drift; ties go to the lower spatial index
   (stable descending sort). Severity ``D_t = mean of d_i over S_t``.
4. Trigger ``D_t > mu + lambda * sigma`` (strict), ``mu``/``sigma`` the mean and population standard
   deviation of the severities of previously accepted chunks of that sample. No trigger while
   ``chunk < warmup``, nor before two severities have been recorded (chunk 0 has no predecessor, so no
   severity; the spread of a single severity is not defined: a population ``sigma = 0`` would make the
   trigger ``D_t > D_{t-1}``, which fires on about half of all chunks of a stationary video). With the
   defaults the first chunk that can trigger is chunk 3 (0-based).
5. On trigger, while the sample has retries left: a :class:`~cachepolicy.policy.PruneRequest` drops every
   resident token whose spatial index is in ``S_t``, in every cached frame and every layer (the engine keeps
   tokens that another policy protects, e.g. an ``attention-sink``; protect beats drop), persistently, and
   regenerates the chunk with the same noise. At most ``retries`` regenerations; a regenerated chunk that
   still triggers is accepted as is. ``retries=0`` detects and traces without pruning.
6. The accepted attempt's severity enters the statistics (whether or not it was regenerated, whether or not
   it still triggered); severities of rejected attempts do not.

Trace fields per chunk (lists with one entry per sample): ``severity`` (accepted attempt; null for chunk 0),
``severity_attempts`` (every attempt's severity, first first), ``threshold`` (``mu + lambda * sigma``; null
during warm-up and before two severities are recorded), ``triggered`` (the first attempt triggered), ``pruned_positions``
(sorted spatial indices pruned at this chunk) and ``tokentrim_retries`` (regenerations TokenTrim asked for).

The maths lives in pure functions (:func:`latent_summary`, :func:`token_drift`, :func:`unstable_set`,
:func:`severity`, :func:`trigger_threshold`, :func:`triggers`) that take and return plain tensors and floats.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from cachepolicy.errors import ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import SPEC_NAME, Policy, PruneRequest, finite_float, non_negative_int

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from cachepolicy.cache import CacheView
    from cachepolicy.chunk import Candidate, StepOutput
    from cachepolicy.engine import Session

logger = logging.getLogger(__name__)

#: Severities that must be recorded before a threshold exists (see :func:`trigger_threshold`).
MIN_HISTORY = 2


# --------------------------------------------------------------------------------------------------
# The paper's equations as pure functions (numbered by the steps of BRIEF.md section 2)
# --------------------------------------------------------------------------------------------------


def latent_summary(grid: torch.Tensor) -> torch.Tensor:
    """Brief section 2, step 1 (latent summary): ``Z = (1/F) * sum_f grid[:, f]``.

    Args:
        grid: ``[B, F, N, D]`` a chunk's latent on the token grid (:meth:`ModelAdapter.token_grid`).

    Returns:
        ``[B, N, D]`` float32 summary (frames averaged, so chunks of any frame count share ``N`` tokens).
    """
    if grid.ndim != 4:
        raise ParameterError(f"a token grid is [B, F, N, D], got shape {tuple(grid.shape)}")
    return grid.float().mean(dim=1)


def token_drift(summary: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Step 2 (per-token drift): ``d_i = ||Z_t(i) - Z_{t-1}(i)||_2``.

    Args:
        summary: ``[B, N, D]`` candidate summary ``Z_t``.
        previous: ``[B, N, D]`` summary ``Z_{t-1}`` of the accepted previous chunk.

    Returns:
        ``[B, N]`` float32 L2 distances (latent units).
    """
    import torch

    if summary.shape != previous.shape:
        raise ParameterError(
            f"summaries of shapes {tuple(summary.shape)} and {tuple(previous.shape)} cannot be compared"
        )
    return torch.linalg.vector_norm(summary.float() - previous.float(), ord=2, dim=-1)


def unstable_count(p: float, num_tokens: int) -> int:
    """``k = ceil(p * N)``, at least 1 and at most ``N``.

    ``p * N`` is rounded to 9 decimals before the ceiling so that the binary representation of ``p`` cannot
    add a token (``0.07 * 100 == 7.000000000000001`` in floating point; ``k`` is 7, not 8).
    """
    return min(num_tokens, max(1, math.ceil(round(p * num_tokens, 9))))


def unstable_set(drift: torch.Tensor, p: float) -> torch.Tensor:
    """Step 3 (unstable set): indices of the ``ceil(p * N)`` tokens of largest drift, per sample.

    Ties are broken towards the lower spatial index (a stable descending sort), so the set is deterministic
    on every device.

    Args:
        drift: ``[B, N]`` per-token drift.
        p: fraction of tokens in the set, in (0, 1).

    Returns:
        ``[B, k]`` int64 spatial indices, ordered by decreasing drift (ties: increasing index).
    """
    import torch

    k = unstable_count(p, drift.shape[-1])
    order = torch.sort(drift, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def severity(drift: torch.Tensor, unstable: torch.Tensor) -> torch.Tensor:
    """Step 3 (severity): ``D_t = mean of d_i over S_t``.

    Args:
        drift: ``[B, N]`` per-token drift.
        unstable: ``[B, k]`` indices of the unstable set.

    Returns:
        ``[B]`` float32 severities (latent units).
    """
    return drift.gather(-1, unstable).mean(dim=-1)


def trigger_threshold(history: list[float], lam: float) -> float | None:
    """Step 4 (adaptive threshold): ``mu + lambda * sigma`` over the severities of accepted chunks.

    ``mu`` is the plain mean and ``sigma`` the population standard deviation (divide by ``n``). Returns None
    (no trigger) with fewer than :data:`MIN_HISTORY` severities: the spread of one value is undefined.
    Computed in float64 with :func:`math.fsum`.
    """
    n = len(history)
    if n < MIN_HISTORY:
        return None
    mu = math.fsum(history) / n
    sigma = math.sqrt(math.fsum((x - mu) ** 2 for x in history) / n)
    return mu + lam * sigma


def triggers(value: float | None, threshold: float | None) -> bool:
    """Step 4 (trigger): the adaptive trigger ``D_t > threshold`` (strict; nothing triggers without both)."""
    return value is not None and threshold is not None and value > threshold


def positions_mask(unstable: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, N]`` bool mask of the positions listed in ``unstable`` ``[B, k]``."""
    import torch

    mask = torch.zeros(unstable.shape[0], num_tokens, dtype=torch.bool, device=unstable.device)
    return mask.scatter_(1, unstable, True)


def prune_mask(view: CacheView, unstable: torch.Tensor, samples: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, S]`` resident tokens whose spatial index is in the sample's unstable set (samples listed only).

    Args:
        view: the resident cache.
        unstable: ``[B, k]`` unstable spatial indices.
        samples: ``[B]`` bool, the samples that prune.
        num_tokens: ``N``, spatial tokens per frame.
    """
    device = view.valid.device
    positions = positions_mask(unstable.to(device), num_tokens)  # [B, N]
    hit = positions.gather(1, view.spatial_index.clamp(0, num_tokens - 1))
    return hit & view.valid & samples.to(device).unsqueeze(1)


def check_session(name: str, summary_at: str, session: Session, label: str | None = None) -> None:
    """Session-start checks shared by the drift-triggered pruning policies (``tokentrim``, ``outlier-trim``).

    The adapter must lay a ``[1, C, 1, H, W]`` latent out as a ``[1, 1, N, D]`` token grid (a one-frame zero
    probe), and ``summary_at=first_step`` is refused under recipes whose blocks are first denoised while
    another block is (rolling and staggered recipes). Errors name the policy ``name`` (``label``: how the
    token-grid error calls it, default ``name``).
    """
    import torch

    info = session.model
    probe = torch.zeros(1, info.latent_channels, 1, info.latent_height, info.latent_width,
                        device=session.cache.device, dtype=session.cache.dtype)
    try:
        grid = session.adapter.token_grid(probe)
    except NotImplementedError as exc:
        raise ParameterError(
            f"{name} cannot run on model {info.name!r}: its adapter {info.adapter!r} provides no "
            f"token-grid mapping (ModelAdapter.token_grid), which {label or name} needs to compare latent "
            f"summaries token by token; use an adapter that implements token_grid"
        ) from exc
    if grid.ndim != 4 or grid.shape[:3] != (1, 1, info.tokens_per_frame):
        raise ParameterError(
            f"{name}: adapter {info.adapter!r} maps a [1, C, 1, H, W] latent to a token grid of shape "
            f"{tuple(grid.shape)}; expected [1, 1, {info.tokens_per_frame}, D] (tokens_per_frame = "
            f"{info.token_rows}x{info.token_cols})"
        )
    rolling = session.recipe is not None and session.recipe.rolling is not None
    if rolling and summary_at == "first_step":
        raise ParameterError(
            f"{name}: summary_at=first_step cannot work under recipe {session.recipe.name!r}: a block's "
            f"first step runs when it enters the rolling window, while blocks committed after it are still "
            f"being denoised, and after_step sees each block only as its window's first block, at its last "
            f"step; use summary_at=final (a retry re-runs one window call)"
        )
    stagger = session.recipe.stagger if session.recipe is not None else None
    if stagger is not None and stagger.ar_step < stagger.steps and summary_at == "first_step":
        raise ParameterError(
            f"{name}: summary_at=first_step cannot work under recipe {session.recipe.name!r}: a block's "
            f"first step runs while the block before it is still being denoised (ar_step={stagger.ar_step} < "
            f"{stagger.steps} steps), and after_step sees a block only once it is its call's first block, "
            f"from step {stagger.steps - stagger.ar_step} on; use summary_at=final (a retry re-runs one call)"
        )


# --------------------------------------------------------------------------------------------------
# Per-rollout state
# --------------------------------------------------------------------------------------------------


@attrs.define
class TokenTrimState:
    """Mutable per-rollout state of one :class:`TokenTrim` (lives in ``session.policy_state``).

    Attributes:
        previous: ``[B, N, D]`` float32 summary of each sample's accepted previous chunk (None before chunk 0).
        history: per sample, severities of accepted chunks (latent units).
        threshold, severity, attempts, triggered, pruned, retries: the current chunk, per sample.
    """

    previous: torch.Tensor | None = None
    history: list[list[float]] = attrs.field(factory=list)
    threshold: list[float | None] = attrs.field(factory=list)
    severity: list[float | None] = attrs.field(factory=list)
    attempts: list[list[float]] = attrs.field(factory=list)
    triggered: list[bool | None] = attrs.field(factory=list)
    pruned: list[set[int]] = attrs.field(factory=list)
    retries: list[int] = attrs.field(factory=list)

    def reset_chunk(self, batch: int) -> None:
        self.threshold = [None] * batch
        self.severity = [None] * batch
        self.attempts = [[] for _ in range(batch)]
        self.triggered = [None] * batch
        self.pruned = [set() for _ in range(batch)]
        self.retries = [0] * batch


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class TokenTrim(Policy):
    """Detect a drifting chunk from its latent summary, prune the unstable positions from the cache, retry.

    Attributes:
        p: fraction of spatial tokens in the unstable set, in (0, 1) (paper: 0.1).
        lam: ``lambda`` in specs: trigger margin in population standard deviations, >= 0 (paper: 2.0).
        warmup: chunks at the start that never trigger (their severities are recorded), >= 0 (paper: 2).
        retries: regenerations of one chunk at most, >= 0 (paper: 1; 0 = detect and trace only).
        summary_at: ``first_step`` (x0-prediction after the first denoising step: a retry costs one step)
            or ``final`` (the chunk's final x0: a retry costs the whole chunk).
    """

    name: ClassVar[str] = "tokentrim"
    summary: ClassVar[str] = "prune drifting spatial tokens from the cache and regenerate (TokenTrim)"
    trace_ranges: ClassVar[Mapping[str, tuple[float | None, float | None]]] = {
        "severity": (0.0, None), "threshold": (0.0, None), "tokentrim_retries": (0.0, None)}

    p: float = attrs.field(default=0.1, validator=finite_float(0.0, 1.0, open_low=True, open_high=True))
    lam: float = attrs.field(default=2.0, validator=finite_float(0.0), metadata={SPEC_NAME: "lambda"})
    warmup: int = attrs.field(default=2, validator=non_negative_int)
    retries: int = attrs.field(default=1, validator=non_negative_int)
    summary_at: Literal["first_step", "final"] = attrs.field(default="first_step")

    @summary_at.validator
    def _check_summary_at(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in ("first_step", "final"):
            raise ParameterError(
                f"tokentrim: summary_at={value!r} is not allowed; choose one of first_step, final"
            )

    def new_state(self) -> TokenTrimState:
        return TokenTrimState()

    # ------------------------------------------------------------------------------------- helpers
    def summarize(self, session: Session, latent: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` latent -> ``[B, N, D]`` float32 summary on the cache's device."""
        grid = session.adapter.token_grid(latent.to(session.cache.device))
        return latent_summary(grid)

    def _decide(self, session: Session, x0: torch.Tensor, active: torch.Tensor,
                view: CacheView) -> PruneRequest | None:
        """Score the candidate ``x0`` ``[B, C, F, H, W]`` of every active sample; ask to prune if it drifts."""
        import torch

        state: TokenTrimState = self.state(session)
        if state.previous is None:  # chunk 0: no accepted predecessor, no drift (D_1 does not exist)
            return None
        drift = token_drift(self.summarize(session, x0), state.previous)
        unstable = unstable_set(drift, self.p)
        severities = severity(drift, unstable).tolist()
        batch = session.batch_size
        active_list = [bool(a) for a in active.tolist()]
        samples = [False] * batch
        for b in range(batch):
            if not active_list[b]:  # only being recomputed for another sample: not re-decided
                continue
            value = severities[b]
            state.severity[b] = value
            state.attempts[b].append(value)
            fired = triggers(value, state.threshold[b])
            if state.triggered[b] is None:
                state.triggered[b] = fired
            if fired and state.retries[b] < self.retries:
                samples[b] = True
        if not any(samples):
            return None
        unstable_cpu = unstable.cpu()
        for b in range(batch):
            if samples[b]:
                state.retries[b] += 1
                state.pruned[b].update(unstable_cpu[b].tolist())
        chosen = torch.tensor(samples, dtype=torch.bool)
        drop = prune_mask(view, unstable, chosen, drift.shape[-1])
        reason = "; ".join(
            f"sample {b}: severity {severities[b]:.4g} > threshold {state.threshold[b]:.4g}"
            for b in range(batch) if samples[b]
        )
        return PruneRequest(drop=drop, samples=chosen, max_restarts=self.retries, reason=f"tokentrim: {reason}")

    # --------------------------------------------------------------------------------------- hooks
    @hookimpl
    def cachepolicy_session_start(self, session: Session) -> None:
        """Check that the adapter lays latents out on the cache's token grid (a one-frame zero probe)."""
        check_session(self.name, self.summary_at, session, label="TokenTrim")
        state: TokenTrimState = self.state(session)
        state.previous = None
        state.history = [[] for _ in range(session.batch_size)]
        state.reset_chunk(session.batch_size)

    @hookimpl
    def cachepolicy_chunk_start(self, session: Session, chunk: int) -> None:
        state: TokenTrimState = self.state(session)
        state.reset_chunk(session.batch_size)
        if chunk >= self.warmup:
            state.threshold = [trigger_threshold(h, self.lam) for h in state.history]

    @hookimpl
    def cachepolicy_after_step(self, session: Session, step: StepOutput) -> PruneRequest | None:
        if self.summary_at != "first_step" or step.step != 0:
            return None
        return self._decide(session, step.x0, step.active, step.view)

    @hookimpl
    def cachepolicy_candidate_ready(self, session: Session, candidate: Candidate) -> PruneRequest | None:
        if self.summary_at != "final":
            return None
        return self._decide(session, candidate.x0, candidate.active, candidate.view)

    @hookimpl
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any]:
        """Record the accepted chunk (summary of the committed latent, its severity) and the trace fields."""
        state: TokenTrimState = self.state(session)
        committed = session.latents[-1]  # [B, C, F, H, W] as committed (after any latent rewrite)
        state.previous = self.summarize(session, committed)
        for b, value in enumerate(state.severity):
            if value is not None:
                state.history[b].append(value)
        if any(state.triggered):
            logger.info("tokentrim chunk %d: severity %s threshold %s triggered %s retries %s", chunk,
                        state.severity, state.threshold, state.triggered, state.retries)
        return {
            "severity": list(state.severity),
            "severity_attempts": [list(a) for a in state.attempts],
            "threshold": list(state.threshold),
            "triggered": [bool(t) for t in state.triggered],
            "pruned_positions": [sorted(s) for s in state.pruned],
            "tokentrim_retries": list(state.retries),
        }


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [TokenTrim]
