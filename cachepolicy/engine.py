"""The rollout session: its state, its hooks, and the public per-chunk machinery the loops are built from.

``Session(adapter, policies, config).run()`` checks everything, calls ``session_start``, runs the recipe's
loop (:func:`cachepolicy.loops.run_chunks`, Self Forcing's chunk loop, :func:`cachepolicy.rolling.run_rolling`,
Rolling Forcing's joint window, or :func:`cachepolicy.stagger.run_stagger`, SkyReels-V2's staggered blocks)
and ``session_end``. A loop is built from these public steps, each taking the chunk's
:class:`~cachepolicy.chunk.ChunkBook`:

``begin_chunk``
    a recipe's event before the chunk (CausVid's restart, a prompt switch with LongLive's re-cache), then
    ``chunk_start``.
``forward``
    one model forward against the cache, in both branches under classifier-free guidance
    (``v = v_uncond + w * (v_cond - v_uncond)`` for a denoising step); policies may move its RoPE positions
    and run inside its layers.
``after_step`` / ``candidate_ready``
    the hooks; a :class:`~cachepolicy.policy.PruneRequest` prunes the cache (protected tokens stay) and
    restarts the chunk with the same noise, at most ``max_restarts`` times per requesting policy and sample
    (samples that did not ask are recomputed from an unchanged cache and the same noise).
``before_commit``
    an optional replacement latent (one policy at most); the latent must be finite.
``commit``
    the context pass over the clean latent (at ``context_noise``); its K/V become resident, the latent joins
    the video (so ``select`` sees it in ``session.latents``).
``select``
    every policy protects and/or drops resident tokens, per token, layer or head; the composed keep set is
    applied once by compacting the cache in frame order; ``after_compaction``.
``end_chunk``
    the trace record, ``chunk_end``.

Every rollout hook goes through :func:`call_each`: a policy's unexpected error is reported as
:class:`~cachepolicy.errors.PolicyHookError` naming the policy, its distribution and the hook.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pluggy
import torch

from cachepolicy.cache import KVCache, metadata_for_chunk
from cachepolicy.chunk import Candidate, ChunkBook, StepOutput
from cachepolicy.errors import (
    CachePolicyError,
    CompositionError,
    NonFiniteOutputError,
    ParameterError,
    PluginLoadError,
    PolicyHookError,
    RolloutConfigError,
)
from cachepolicy.hookspecs import PROJECT_NAME, RolloutSpecs
from cachepolicy.layers import ForwardCall, LayerContext, LayerEdit, LayerRequest, RopePositions, describe
from cachepolicy.loops import run_chunks
from cachepolicy.models import ModelAdapter, ModelInfo, Sampler
from cachepolicy.noise import NoiseSource, NoiseSpec, NoiseStream, OfficialNoise, SeededNoise
from cachepolicy.policy import Policy, PruneRequest, Resolution, Selection, cache_bound_frames, check_unique, compose
from cachepolicy.recipes import Recipe
from cachepolicy.rolling import run_rolling
from cachepolicy.stagger import run_stagger

logger = logging.getLogger(__name__)

__all__ = ["CUT_MARK", "Candidate", "PromptSwitch", "RolloutConfig", "RolloutResult", "Session", "StepOutput",
           "call_each", "rollout"]


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RolloutConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _prompts(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


#: a prompt that starts with this marks its switch as a scene cut (:attr:`PromptSwitch.cut`)
CUT_MARK = "#"


@attrs.frozen
class PromptSwitch:
    """From ``chunk`` on, the samples follow ``prompts`` (one per sample, or one for all).

    Under a recipe with :class:`~cachepolicy.recipes.Recache` (LongLive) the cache is re-encoded under the
    new prompts before ``chunk`` is generated; otherwise only the conditioning changes.

    ``cut``: the switch is a hard scene cut (a policy may treat it differently from a continuing scene, e.g.
    ``infinity-rope``'s RoPE cut). Prompts that all start with ``#`` (:data:`CUT_MARK`) mark a cut as well
    (``PromptSwitch(9, "#a beach at night")``, ``--switch '9:#a beach at night'``); the mark is removed
    before the prompts are encoded. Some prompts marked and others not is an error.
    """

    chunk: int = attrs.field()
    prompts: tuple[str, ...] = attrs.field(converter=_prompts)
    cut: bool = attrs.field(default=False)

    def __attrs_post_init__(self) -> None:
        marked = [p.startswith(CUT_MARK) for p in self.prompts]
        if any(marked) and not all(marked):
            raise RolloutConfigError(f"the prompt switch at chunk {self.chunk} marks a scene cut ('{CUT_MARK}') "
                                     f"in some prompts only: mark all of {list(self.prompts)} or none")
        if all(marked):
            stripped = tuple(p[len(CUT_MARK):].strip() for p in self.prompts)
            if not all(stripped):
                raise RolloutConfigError(f"the prompt switch at chunk {self.chunk} has a scene-cut mark "
                                         f"'{CUT_MARK}' but no prompt after it: {list(self.prompts)}")
            object.__setattr__(self, "prompts", stripped)  # frozen: set once, during construction
            object.__setattr__(self, "cut", True)

    @cut.validator
    def _check_cut(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bool):
            raise RolloutConfigError(f"PromptSwitch.cut must be true or false, got {value!r}")

    @chunk.validator
    def _check_chunk(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RolloutConfigError(f"a prompt switch needs a chunk index >= 1 (chunk 0 uses the first prompts), "
                                     f"got {value!r}")

    @prompts.validator
    def _check_prompts(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value or not all(isinstance(p, str) and p for p in value):
            raise RolloutConfigError(f"a prompt switch needs non-empty prompt strings, got {value!r}")


def _noise_source(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, NoiseSource):
        raise RolloutConfigError(f"noise must be a NoiseSource (e.g. SeededNoise(), RecordedNoise(draws)), "
                                 f"got {type(value).__name__}")


@attrs.frozen
class RolloutConfig:
    """What to generate.

    Attributes:
        num_chunks: chunks to generate (each ``frames_per_chunk`` latent frames).
        prompts: one prompt per sample; the batch size is ``len(prompts)``.
        seeds: one seed per sample (same length as ``prompts``).
        sampler: the denoising recipe; None uses the recipe's, else the model's own (:attr:`ModelInfo.sampler`).
        synchronize_timing: synchronise the device around each model forward so that per-chunk
            ``forward_seconds`` are exact on GPUs (costs a sync per forward; off by default).
        recipe: the system's inference loop (:mod:`cachepolicy.recipes`); None is plain Self Forcing
            chunking with the model's sampler. Its policies are added by the callers that build policies
            (:func:`cachepolicy.recipes.merge_policy_specs`), not here.
        prompt_switches: prompt changes mid-video, at increasing chunks in ``[1, num_chunks)``.
        noise: where the noise comes from (:mod:`cachepolicy.noise`); None: :class:`~cachepolicy.noise.SeededNoise`.
        trace_residency: record the resident tokens after every chunk in the trace (``residency``; costs a
            host read of the cache metadata per chunk and a large trace for long videos).
    """

    num_chunks: int = attrs.field(validator=_positive_int)
    prompts: tuple[str, ...] = attrs.field(converter=tuple)
    seeds: tuple[int, ...] = attrs.field(converter=tuple)
    sampler: Sampler | None = None
    synchronize_timing: bool = False
    recipe: Recipe | None = None
    prompt_switches: tuple[PromptSwitch, ...] = attrs.field(default=(), converter=tuple)
    noise: NoiseSource | None = attrs.field(default=None, validator=_noise_source)
    trace_residency: bool = False

    @prompt_switches.validator
    def _check_switches(self, attribute: attrs.Attribute, value: tuple[PromptSwitch, ...]) -> None:
        previous = 0
        for switch in value:
            if not isinstance(switch, PromptSwitch):
                raise RolloutConfigError(f"prompt_switches holds {switch!r}, expected PromptSwitch")
            if switch.chunk >= self.num_chunks:
                raise RolloutConfigError(
                    f"a prompt switch at chunk {switch.chunk} does not exist: the rollout has chunks "
                    f"0..{self.num_chunks - 1}, so switches can be at chunks 1..{self.num_chunks - 1}"
                )
            if switch.chunk <= previous:
                raise RolloutConfigError(
                    f"prompt switches must be at strictly increasing chunks, got chunk {switch.chunk} after "
                    f"{previous}"
                )
            if len(switch.prompts) not in (1, len(self.prompts)):
                raise RolloutConfigError(
                    f"the prompt switch at chunk {switch.chunk} has {len(switch.prompts)} prompts for "
                    f"{len(self.prompts)} samples: give one prompt or one per sample"
                )
            previous = switch.chunk

    @prompts.validator
    def _check_prompts(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value:
            raise RolloutConfigError("a rollout needs at least one prompt (one per sample)")
        if not all(isinstance(p, str) for p in value):
            raise RolloutConfigError(f"prompts must be strings, got {value!r}")

    @seeds.validator
    def _check_seeds(self, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
        if len(value) != len(self.prompts):
            raise RolloutConfigError(
                f"{len(value)} seeds for {len(self.prompts)} prompts: give one seed per sample"
            )
        for seed in value:
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise RolloutConfigError(f"seed {seed!r} is not an integer in [0, 2**63)")

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


@attrs.frozen(eq=False)
class RolloutResult:
    """A finished (or stopped) rollout: committed latents ``[B, C, T, H, W]`` on the CPU and the trace."""

    latents: torch.Tensor
    trace: list[dict[str, Any]]
    model: ModelInfo
    policies: tuple[Policy, ...]
    config: RolloutConfig


@functools.lru_cache(maxsize=None)
def _distribution_of(module: str) -> str | None:
    from importlib.metadata import packages_distributions

    names = packages_distributions().get(module.split(".", 1)[0])
    return names[0] if names else None


def call_each(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call every implementation of a hook, in plugin-name order, and return ``(plugin name, result)``.

    Every rollout hook goes through here: unlike a plain pluggy call this keeps ``None`` results aligned with
    the plugin that returned them, the call order (sorted by policy spec) does not depend on the order in
    which policies were composed, and an unexpected error of a policy is raised as
    :class:`~cachepolicy.errors.PolicyHookError` naming it (the project's own errors pass unchanged).
    """
    impls = sorted(getattr(pm.hook, hook_name).get_hookimpls(), key=lambda impl: impl.plugin_name)
    return [(impl.plugin_name, _call(impl, hook_name, kwargs)) for impl in impls]


def _call(impl: Any, hook_name: str, kwargs: dict[str, Any]) -> Any:
    try:
        return impl.function(*[kwargs[name] for name in impl.argnames])
    except CachePolicyError:
        raise
    except Exception as exc:
        module = type(impl.plugin).__module__
        raise PolicyHookError(impl.plugin_name, hook_name, _distribution_of(module),
                              f"{type(exc).__name__}: {exc}") from exc


class Session:
    """One rollout: owns every piece of mutable state (cache, per-policy state, trace, latents)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        policies: Sequence[Policy],
        config: RolloutConfig,
        *,
        on_chunk: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
    ) -> None:
        check_unique(policies)
        self.adapter = adapter
        self.model: ModelInfo = adapter.info
        self.policies: tuple[Policy, ...] = tuple(policies)
        self.config = config
        self.recipe: Recipe | None = config.recipe
        recipe_sampler = self.recipe.sampler if self.recipe is not None else None
        self.sampler: Sampler = config.sampler or recipe_sampler or self.model.sampler
        self.batch_size = config.batch_size
        self.on_chunk = on_chunk
        self.progress = progress
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(RolloutSpecs)
        for policy in self.policies:
            try:
                self.pm.register(policy, name=policy.spec)
            except pluggy.PluginValidationError as exc:
                raise PluginLoadError(f"policy {policy.spec!r} does not fit the rollout hooks: {exc}") from exc
        try:
            self.pm.check_pending()  # a misspelt hook name on a policy is an error, not a silent no-op
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"policy {exc.plugin!s} does not fit the rollout hooks: {exc}") from exc
        self.policy_state: dict[str, Any] = {p.spec: p.new_state() for p in self.policies}
        #: the cache: every layer's (and under guidance every branch's) keys and values, one token table
        self.cache: KVCache = adapter.new_cache(self.batch_size, rope_mode=self._rope_mode(),
                                                branches=2 if self.sampler.guided else 1)
        self.conditioning: Any = None
        #: the empty prompt's conditioning for the unconditional branch (encoded by :meth:`check`)
        self.unconditional: Any = None
        #: the conditioning of the first prompts (key -1) and of each prompt switch (key: its chunk), encoded
        #: by :meth:`check`, so a prompt the model cannot take fails before anything is generated or written
        self._encoded: dict[int, Any] | None = None
        #: the rollout's noise (created by :meth:`run`)
        self.noise: NoiseStream | None = None
        self.chunk: int = -1
        self.trace: list[dict[str, Any]] = []
        #: each trace field a policy's ``chunk_end`` returned -> that policy's spec
        self.trace_sources: dict[str, str] = {}
        #: committed latents ``[B, C, F, H, W]`` per chunk, on the CPU (the chunk being selected included)
        self.latents: list[torch.Tensor] = []
        self._layer_hooks = {impl.plugin_name: impl for impl in self.pm.hook.cachepolicy_layer.get_hookimpls()}
        self._asks_layers = bool(self.pm.hook.cachepolicy_layer_request.get_hookimpls())
        self._moves_positions = bool(self.pm.hook.cachepolicy_rope_positions.get_hookimpls())

    def _rope_mode(self) -> str:
        wanted = {p.spec: p.rope_mode for p in self.policies if p.rope_mode is not None}
        recipe_mode = self.recipe.rope_mode if self.recipe is not None else None
        modes = set(wanted.values()) | ({recipe_mode} if recipe_mode and recipe_mode != "absolute" else set())
        if len(modes) > 1:
            raise CompositionError(f"policies need different RoPE cache modes: {wanted}")
        return modes.pop() if modes else "absolute"

    # -------------------------------------------------------------------------------------- checks
    def check(self) -> None:
        """Validate everything that can be validated before the first chunk, encode every prompt (the first
        ones and those of each switch: a prompt the model refuses fails here) and size the cache."""
        if self.cache.batch_size != self.batch_size:
            raise RolloutConfigError(
                f"the cache holds {self.cache.batch_size} samples but the rollout has {self.batch_size}"
            )
        for policy in self.policies:
            policy.check_compatible(self.model)
        frames = self.model.frames_per_chunk
        num_frames = self.config.num_chunks * frames
        if self.recipe is not None:
            if self.recipe.restart is not None:
                self.recipe.restart.check(frames)
            if self.recipe.rolling is not None:
                self.recipe.rolling.check(frames, len(self.sampler.sigmas()))
            if self.recipe.stagger is not None:
                self.recipe.stagger.check(self.model, self.sampler, self.config.prompt_switches)
            if self.recipe.rope_mode != "absolute" and self.cache.rope_mode != self.recipe.rope_mode:
                raise RolloutConfigError(
                    f"recipe {self.recipe.name!r} needs a cache with rope_mode={self.recipe.rope_mode!r}, the "
                    f"adapter gave {self.cache.rope_mode!r}"
                )
            num_frames = self.recipe.max_rope_frames(num_frames)
        self.adapter.check_rollout(num_frames, self.batch_size)
        if isinstance(self.config.noise, OfficialNoise) and self.sampler.context_noise > 0:
            raise RolloutConfigError(f"the {self.config.noise.order} script's noise has no context-pass draws: a "
                                     f"sampler with context_noise={self.sampler.context_noise:g} needs seeded noise")
        if self._encoded is None:
            encoded = {-1: self.adapter.encode_prompts(list(self.config.prompts))}
            for switch in self.config.prompt_switches:
                encoded[switch.chunk] = self.adapter.encode_prompts(self._switch_prompts(switch))
            self._encoded = encoded
            if self.sampler.guided:
                self.unconditional = self.adapter.encode_prompts([""] * self.batch_size)
        self._size_cache(num_frames)

    def _switch_prompts(self, switch: PromptSwitch) -> list[str]:
        return list(switch.prompts) * (self.batch_size if len(switch.prompts) == 1 else 1)

    def _size_cache(self, num_frames: int) -> None:
        """Allocate the buffers once for what the policies allow (:meth:`Policy.cache_bound`) plus the largest
        call: one chunk, a Rolling Forcing window, SkyReels' staggered blocks, or LongLive's re-encoded frames.
        A call's new frames are frames of the video, so resident and new frames never pass ``num_frames``
        together (a full cache is sized for the video, as Self Forcing's buffer is); re-encoded frames are
        resident ones run again."""
        tokens_per_frame, frames = self.model.tokens_per_frame, self.model.frames_per_chunk
        new_frames = frames
        if self.recipe is not None and self.recipe.rolling is not None:
            new_frames = frames * min(self.config.num_chunks, len(self.sampler.sigmas()))
        if self.recipe is not None and self.recipe.stagger is not None:
            new_frames = frames * self.recipe.stagger.window_blocks(num_frames // frames)
        bound = cache_bound_frames(self.policies, self.model, num_frames)
        total, call_frames = min(bound + new_frames, max(num_frames, new_frames)), new_frames
        if self.recipe is not None and self.recipe.recache is not None and self.config.prompt_switches:
            call_frames = max(call_frames, self.recipe.recache.window_frames)
            total = max(total, bound + self.recipe.recache.window_frames)
        self.cache.reserve(call_frames * tokens_per_frame, total=total * tokens_per_frame)

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> RolloutResult:
        """Generate ``config.num_chunks`` chunks. On error the latents and trace so far stay on the session."""
        self.check()
        self.conditioning = self._encoded[-1]
        model = self.model
        shape = (model.latent_channels, model.frames_per_chunk, model.latent_height, model.latent_width)
        source = self.config.noise or SeededNoise()
        self.noise = source.stream(NoiseSpec(self.config.seeds, shape, self.cache.device, self.cache.dtype,
                                             self.config.num_chunks, len(self.sampler.sigmas())))
        call_each(self.pm, "cachepolicy_session_start", session=self)
        try:
            if self.recipe is not None and self.recipe.rolling is not None:
                run_rolling(self)
            elif self.recipe is not None and self.recipe.stagger is not None:
                run_stagger(self)
            else:
                run_chunks(self)
        finally:
            call_each(self.pm, "cachepolicy_session_end", session=self)
        return self.result()

    def result(self) -> RolloutResult:
        """The latents and trace generated so far."""
        model = self.model
        if self.latents:
            latents = torch.cat(self.latents, dim=2)
        else:
            latents = torch.zeros(self.batch_size, model.latent_channels, 0, model.latent_height, model.latent_width)
        return RolloutResult(latents, list(self.trace), model, self.policies, self.config)

    def chunk_indices(self, total: int | None = None, what: str = "chunks") -> Any:
        """``range(total or num_chunks)``, with a progress bar when the session shows progress."""
        indices = range(self.config.num_chunks if total is None else total)
        if self.progress:
            from tqdm.auto import tqdm

            return tqdm(indices, desc=what, unit=what.rstrip("s"))
        return indices

    # ----------------------------------------------------------------------------- per-chunk steps
    def new_book(self, chunk: int) -> ChunkBook:
        """The bookkeeping of ``chunk`` (its noise is drawn through it, once per use)."""
        return ChunkBook(chunk=chunk, frame_start=chunk * self.model.frames_per_chunk, noise=self.noise,
                         batch_size=self.batch_size, policies=tuple(p.spec for p in self.policies))

    def begin_chunk(self, chunk: int, book: ChunkBook | None = None) -> ChunkBook:
        """Start ``chunk`` (``book`` when its noise was already drawn from, e.g. a block in a rolling window):
        a recipe's restart or a prompt switch (with LongLive's re-cache) first, then ``chunk_start``."""
        self.chunk = chunk
        book = self.new_book(chunk) if book is None else book
        book.started = time.perf_counter()
        book.forward_seconds = 0.0
        self._recipe_events(book)
        call_each(self.pm, "cachepolicy_chunk_start", session=self, chunk=chunk)
        return book

    def rope_start(self, chunk: int, frame_start: int) -> int:
        """RoPE frame position of ``frame_start`` in ``chunk`` (CausVid's restarts count from their origin)."""
        restart = self.recipe.restart if self.recipe is not None else None
        if restart is None:
            return frame_start
        return frame_start - restart.origin(chunk, self.model.frames_per_chunk)

    def forward(self, book: ChunkBook, latent: torch.Tensor, timestep: float | torch.Tensor, *, phase: str,
                step: int | None = None, frame_start: int | None = None, chunk: int | None = None,
                rope_start: int | None = None, visible: torch.Tensor | None = None,
                rope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """One model forward of ``latent`` ``[B, C, F, H, W]`` against the cache.

        ``timestep``: one value or ``[B, F]``; ``phase``: ``"step"`` (returns the velocity, guided when the
        sampler guides), ``"context"`` (the call's K/V stay in the provisional slot for :meth:`commit`) or
        ``"reencode"`` (conditional branch only). ``frame_start``, ``chunk``, ``rope_start`` default to the
        book's; ``visible`` and ``rope_positions`` (``[B, S]``) restrict and move the resident keys.
        """
        frame_start = book.frame_start if frame_start is None else frame_start
        chunk = book.chunk if chunk is None else chunk
        rope_start = self.rope_start(chunk, frame_start) if rope_start is None else rope_start
        if isinstance(timestep, torch.Tensor):
            timesteps = timestep
        else:
            timesteps = torch.full((self.batch_size, latent.shape[2]), float(timestep))
        call = ForwardCall(chunk=chunk, phase=phase, frame_start=frame_start, num_frames=latent.shape[2],
                           rope_start=rope_start, step=step, attempt=book.attempt,
                           first=phase == "step" and not book.first_forward_done, visible=visible,
                           rope_positions=rope_positions)
        if self._moves_positions:
            call = self._positions(call)
        observer, wants = self._observer(call) if self._asks_layers else (None, None)
        sync = self.config.synchronize_timing and self.cache.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.cache.device)
        start = time.perf_counter()
        with self.cache.observing(observer, wants):
            out = self.adapter.forward(latent, timesteps, call, self.cache, self.conditioning)
        if self.cache.branches > 1 and phase != "reencode":
            uncond = self.adapter.forward(latent, timesteps, attrs.evolve(call, branch=1), self.cache,
                                          self.unconditional)
            if phase == "step":  # v = v_uncond + w * (v_cond - v_uncond), in float32 at least
                wide = torch.promote_types(out.dtype, torch.float32)
                out = (uncond.to(wide) + self.sampler.guidance * (out.to(wide) - uncond.to(wide))).to(out.dtype)
        if sync:
            torch.cuda.synchronize(self.cache.device)
        book.forward_seconds += time.perf_counter() - start
        if phase == "step":
            book.first_forward_done = True
        return out

    def after_step(self, book: ChunkBook, step: StepOutput) -> bool:
        """``after_step`` for every policy; True when a prune request restarts the chunk."""
        return self._prune(book, call_each(self.pm, "cachepolicy_after_step", session=self, step=step))

    def candidate(self, book: ChunkBook, x0: torch.Tensor, frame_start: int | None = None) -> Candidate:
        """The chunk's final ``x0`` as the hooks see it."""
        return Candidate(book.chunk, book.attempt, book.frame_start if frame_start is None else frame_start, x0,
                         book.active, self.cache.view(), book.retries_per_sample())

    def candidate_ready(self, book: ChunkBook, candidate: Candidate) -> bool:
        """``candidate_ready`` for every policy; True when a prune request restarts the chunk."""
        return self._prune(book, call_each(self.pm, "cachepolicy_candidate_ready", session=self,
                                           candidate=candidate))

    def before_commit(self, book: ChunkBook, candidate: Candidate) -> torch.Tensor:
        """``before_commit``: the latent to commit (a policy's replacement, at most one), checked finite."""
        latent = candidate.x0
        rewrites = [(name, out) for name, out in
                    call_each(self.pm, "cachepolicy_before_commit", session=self, candidate=candidate)
                    if out is not None]
        if len(rewrites) > 1:
            raise CompositionError(
                f"policies {', '.join(n for n, _ in rewrites)} all rewrite the latent of chunk {book.chunk}; "
                f"compose at most one latent-rewriting policy"
            )
        if rewrites:
            name, latent = rewrites[0]
            if not isinstance(latent, torch.Tensor) or latent.shape != candidate.x0.shape:
                raise CompositionError(
                    f"policy {name} returned {describe(latent)} from cachepolicy_before_commit, expected a latent "
                    f"of shape {list(candidate.x0.shape)}"
                )
            if not bool(torch.isfinite(latent).all()):
                raise PolicyHookError(name, "cachepolicy_before_commit", None,
                                      f"the replacement latent of chunk {book.chunk} is not finite")
        if not bool(torch.isfinite(latent).all()):
            frames = self.model.frames_per_chunk
            raise NonFiniteOutputError(book.chunk, f"latent frames {candidate.frame_start}.."
                                                   f"{candidate.frame_start + frames - 1}" + self._cache_blame())
        return latent

    def commit(self, book: ChunkBook, latent: torch.Tensor, *, visible: torch.Tensor | None = None) -> None:
        """The context pass: run the clean ``latent`` once more (noised to ``context_noise`` when positive,
        with the chunk's last noise use), make its K/V resident, and append it to :attr:`latents`."""
        context_noise = self.sampler.context_noise
        context = latent
        if context_noise > 0:
            s = context_noise / 1000.0
            noise = book.draw(len(self.sampler.sigmas()))
            context = ((1.0 - s) * latent.float() + s * noise.float()).to(latent.dtype)
        self.context_pass(book, context, visible=visible)
        self.latents.append(latent.detach().to("cpu"))

    def context_pass(self, book: ChunkBook, latent: torch.Tensor, *, frame_start: int | None = None,
                     chunk: int | None = None, rope_start: int | None = None,
                     visible: torch.Tensor | None = None) -> None:
        """Run ``latent`` at the context noise (every branch) and make its K/V resident (metadata: ``chunk``,
        absolute frames from ``frame_start``, RoPE positions from ``rope_start``)."""
        frame_start = book.frame_start if frame_start is None else frame_start
        chunk = book.chunk if chunk is None else chunk
        rope_start = self.rope_start(chunk, frame_start) if rope_start is None else rope_start
        self.forward(book, latent, self.sampler.context_noise, phase="context", frame_start=frame_start,
                     chunk=chunk, rope_start=rope_start, visible=visible)
        info = self.model
        self.cache.commit(metadata_for_chunk(self.batch_size, frame_start, latent.shape[2], info.token_rows,
                                             info.token_cols, chunk, rope_start=rope_start, device=self.cache.device))

    def select(self, book: ChunkBook) -> Resolution:
        """``select`` for every policy; compose (protect beats drop, per layer and head) and compact once;
        ``after_compaction``."""
        view = self.cache.view()
        selections: dict[str, Selection | None] = {}
        for name, selection in call_each(self.pm, "cachepolicy_select", session=self, view=view):
            if selection is not None and not isinstance(selection, Selection):
                raise CompositionError(f"policy {name} returned {describe(selection)} from cachepolicy_select, "
                                       f"expected Selection or None")
            selections[name] = selection
        resolution = compose(selections, view.valid, self.model.num_layers, self.model.num_heads)
        self.cache.compact(resolution.keep, pin=resolution.protected)
        call_each(self.pm, "cachepolicy_after_compaction", session=self, chunk=book.chunk)
        return resolution

    def end_chunk(self, book: ChunkBook, resolution: Resolution) -> dict[str, Any]:
        """Write the chunk's trace record (``chunk_end`` fields merged in) and report it."""
        frames, chunk = self.model.frames_per_chunk, book.chunk
        dropped = dict(resolution.dropped_by)
        for name, count in book.pruned_by.items():
            dropped[name] = dropped.get(name, 0) + count
        cache = self.cache
        record: dict[str, Any] = {
            "chunk": chunk,
            "frames": [book.frame_start, book.frame_start + frames],
            "cache_tokens": cache.max_length,
            "cache_tokens_per_sample": list(cache.lengths),
            "dropped_tokens": dropped,
            "retries": book.attempt,
            "retries_per_sample": list(book.retries_per_sample()),
            "cache_bytes": cache.nbytes(),
            **book.record,
        }
        if cache.split:
            heads = cache.head_lengths()
            record["cache_tokens_per_head"] = round(sum(map(sum, heads)) / (len(heads) * len(heads[0])), 3)
        for name, extra in call_each(self.pm, "cachepolicy_chunk_end", session=self, chunk=chunk):
            if not extra:
                continue
            clash = set(extra) & set(record)
            if clash:
                raise CompositionError(f"policy {name} writes trace fields {sorted(clash)} that are already set")
            record.update(extra)
            self.trace_sources.update(dict.fromkeys(extra, name))
        if self.config.trace_residency:
            record["residency"] = cache.residency_record(self.model.tokens_per_frame)
        record["seconds"] = time.perf_counter() - book.started
        record["forward_seconds"] = book.forward_seconds
        self.trace.append(record)
        logger.debug("chunk %d: %s", chunk, record)
        if self.on_chunk is not None:
            self.on_chunk(record)
        return record

    # ------------------------------------------------------------------------------------- internals
    def _recipe_events(self, book: ChunkBook) -> None:
        """Before ``book.chunk`` is denoised: a recipe's restart (CausVid) and a prompt switch, with a re-cache
        under a recipe that has one (LongLive). Trace fields go to ``book.record``."""
        chunk, frame_start = book.chunk, book.frame_start
        frames = self.model.frames_per_chunk
        restart = self.recipe.restart if self.recipe is not None else None
        if restart is not None and restart.restarts_at(chunk, frames):
            # a new rollout: empty cache, the last generated frames committed at RoPE position 0
            overlap = torch.cat(self.latents, dim=2)[:, :, -restart.overlap_frames:]
            overlap = overlap.to(device=self.cache.device, dtype=self.cache.dtype)
            self.cache.clear()
            self.context_pass(book, overlap, frame_start=frame_start - restart.overlap_frames, chunk=chunk - 1,
                              rope_start=0)
            book.record["restart_overlap_frames"] = [frame_start - restart.overlap_frames, frame_start]
        switch = next((s for s in self.config.prompt_switches if s.chunk == chunk), None)
        if switch is None:
            return
        self.conditioning = self._encoded[switch.chunk]
        book.record["prompt_switch"] = self._switch_prompts(switch)
        recache = self.recipe.recache if self.recipe is not None else None
        if recache is None:
            return
        first, count = recache.frames(frame_start)
        if count <= 0:
            return
        latent = torch.cat(self.latents, dim=2)[:, :, first:first + count]
        latent = latent.to(device=self.cache.device, dtype=self.cache.dtype)
        # re-encode under the new prompt, seeing the resident tokens of other frames and themselves; the
        # conditional branch only (the unconditional prompt "" does not switch)
        view = self.cache.view()
        stale = (view.frame >= first) & (view.frame < first + count)
        self.forward(book, latent, self.sampler.context_noise, phase="reencode", frame_start=first,
                     visible=view.valid & ~stale)
        replaced = self.cache.replace_frames(first, count, self.model.tokens_per_frame, branch=0)
        book.record["recached_frames"] = [first, first + count]
        book.record["recached_tokens"] = replaced

    def _positions(self, call: ForwardCall) -> ForwardCall:
        """Apply a policy's ``cachepolicy_rope_positions`` to ``call`` (at most one policy moves positions)."""
        moves = [(name, out) for name, out in
                 call_each(self.pm, "cachepolicy_rope_positions", session=self, call=call) if out is not None]
        if not moves:
            return call
        if len(moves) > 1:
            raise CompositionError(f"policies {', '.join(n for n, _ in moves)} all move RoPE positions; "
                                   f"compose at most one")
        name, positions = moves[0]
        if not isinstance(positions, RopePositions):
            raise CompositionError(f"policy {name} returned {describe(positions)} from cachepolicy_rope_positions, "
                                   f"expected RopePositions or None")
        changes: dict[str, Any] = {}
        if positions.resident is not None:
            if call.rope_positions is not None:
                raise CompositionError(f"policy {name} moves resident RoPE positions in a call whose recipe "
                                       f"already moves them")
            changes["rope_positions"] = positions.resident
        if positions.own_start is not None:
            changes["rope_start"] = int(positions.own_start)
        return attrs.evolve(call, **changes)

    def _observer(self, call: ForwardCall) -> tuple[Callable | None, Callable | None]:
        """The in-layer hooks of the policies that request ``call`` (None: the plain per-layer path)."""
        requests = []
        for name, request in call_each(self.pm, "cachepolicy_layer_request", session=self, call=call):
            if request is None:
                continue
            if not isinstance(request, LayerRequest):
                raise CompositionError(f"policy {name} returned {describe(request)} from "
                                       f"cachepolicy_layer_request, expected LayerRequest or None")
            if name not in self._layer_hooks:
                raise CompositionError(f"policy {name} requests layers but implements no cachepolicy_layer")
            requests.append((name, request))
        if not requests:
            return None, None

        def observe(context: LayerContext) -> list[tuple[str, LayerEdit]]:
            edits = []
            for name, request in requests:
                if request.wants(context.index):
                    edit = _call(self._layer_hooks[name], "cachepolicy_layer", {"session": self, "layer": context})
                    if edit is not None:
                        edits.append((name, edit))
            return edits

        return observe, lambda layer: any(request.wants(layer) for _, request in requests)

    def _prune(self, book: ChunkBook, results: list[tuple[str, Any]]) -> bool:
        """Apply prune requests; when some sample restarts, update ``book`` (attempt, active) and return True.
        Tokens a policy protects at ``select`` stay (per layer and head for granular protections)."""
        requests = [(name, req) for name, req in results if req is not None]
        if not requests:
            return False
        view = self.cache.view()
        protected = self._protected(view)
        shielded = protected if protected.ndim == 2 else protected.flatten(0, 1).all(dim=0)
        restart = torch.zeros(self.batch_size, dtype=torch.bool)
        drop = torch.zeros_like(view.valid)
        for name, request in requests:
            if not isinstance(request, PruneRequest):
                raise ParameterError(f"policy {name} returned {describe(request)}, expected PruneRequest")
            if request.drop.shape != view.valid.shape:
                raise ParameterError(
                    f"policy {name}: PruneRequest.drop has shape {tuple(request.drop.shape)}, "
                    f"the cache view is {tuple(view.valid.shape)}"
                )
            counts = book.restarts[name]
            allowed = torch.tensor([bool(request.samples[b]) and counts[b] < request.max_restarts
                                    for b in range(self.batch_size)])
            if not bool(allowed.any()):
                logger.debug("chunk %d: %s asked to restart past its bound (%d)", book.chunk, name,
                             request.max_restarts)
                continue
            for b in range(self.batch_size):
                if allowed[b]:
                    counts[b] += 1
            mask = request.drop.to(view.valid.device) & allowed.to(view.valid.device).unsqueeze(1) & view.valid
            removed = int((mask & ~shielded).sum())
            book.pruned_by[name] = book.pruned_by.get(name, 0) + removed
            drop |= mask
            restart |= allowed
            logger.info("chunk %d: %s prunes %d tokens and restarts samples %s (%s)", book.chunk, name,
                        removed, restart.nonzero().squeeze(1).tolist(), request.reason)
        if not bool(restart.any()):
            return False
        self.cache.compact(view.valid & ~(drop & ~protected))
        book.active = restart
        book.attempt += 1
        return True

    def _protected(self, view: Any) -> torch.Tensor:
        """What some policy protects at ``select`` (``select`` must be a pure function of session and view):
        bool ``[B, S]``, or ``[L, H, B, S]`` when a protection is per layer or head."""
        masks = [selection.protect for _, selection in
                 call_each(self.pm, "cachepolicy_select", session=self, view=view)
                 if selection is not None and selection.protect is not None]
        if not any(mask.ndim > 2 for mask in masks):
            protect = torch.zeros_like(view.valid)
            for mask in masks:
                protect |= mask
            return protect
        info = self.model
        protect = torch.zeros(info.num_layers, info.num_heads, *view.valid.shape, dtype=torch.bool,
                              device=view.valid.device)
        for mask in masks:
            protect |= mask if mask.ndim == 4 else (mask[:, None] if mask.ndim == 3 else mask[None, None])
        return protect

    def _cache_blame(self) -> str:
        """A note for a non-finite output when the cache already held non-finite keys or values."""
        bad = [cell for cell in self.cache.cells
               if not bool(torch.isfinite(cell.k[:, :cell.residency.max_length]).all())
               or not bool(torch.isfinite(cell.v[:, :cell.residency.max_length]).all())]
        if not bad:
            return ""
        hooks = ("cachepolicy_session_start", "cachepolicy_chunk_start", "cachepolicy_after_compaction",
                 "cachepolicy_layer")
        editors = sorted({impl.plugin_name for hook in hooks for impl in getattr(self.pm.hook, hook).get_hookimpls()})
        return (f"; the KV cache already held non-finite keys or values (layer {bad[0].layer}), so a policy "
                f"that edits the cache wrote them, not the model" + (f": one of {', '.join(editors)}" if editors
                                                                      else ""))


def rollout(adapter: ModelAdapter, policies: Sequence[Policy], config: RolloutConfig, **kwargs: Any) -> RolloutResult:
    """Run one rollout (see :class:`Session`)."""
    return Session(adapter, policies, config, **kwargs).run()
