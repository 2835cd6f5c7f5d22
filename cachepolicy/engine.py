"""The autoregressive rollout engine (Self Forcing's semantics) and its hook points.

Per chunk ``c`` of ``F = frames_per_chunk`` latent frames (absolute frames ``[c*F, (c+1)*F)``):

1. Draw the chunk's noise: one ``[C, F, H, W]`` tensor per sample and per use, from a CPU generator
   seeded by ``(sample seed, chunk, use)``. Noise therefore never depends on what happened in earlier
   chunks (retries, other policies), so runs with different policies stay comparable seed for seed, and a
   batched run equals running each sample alone.
2. For each warped timestep ``sigma_i`` of the sampler: run the model on the noisy chunk against the
   resident cache (its own K/V are written provisionally), compute ``x0 = x - sigma_i * v`` in float64,
   call ``after_step``; unless last, re-noise ``x = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * eps_{i+1}`` with
   fresh noise ``eps_{i+1}`` (or, with ``Sampler(noise="predicted")``, the predicted noise, which is the
   Euler step ``x + (sigma_{i+1} - sigma_i) * v``).
3. ``candidate_ready``; then ``before_commit``; check the latent is finite.
4. The context pass: the clean latent at ``context_noise`` (default 0) is run once more; its K/V become
   resident (commit).
5. ``select``: every policy protects and/or drops resident tokens; the composed keep set is applied once
   by compacting the cache in frame order; ``after_compaction``; ``chunk_end``.

Classifier-free guidance (``Sampler(guidance=w)``, ``w != 1``): every forward of steps 2 and 4 runs twice,
with the prompts against :attr:`Session.cache` and with the empty prompt against
:attr:`Session.unconditional_cache`; a denoising step uses ``v = v_uncond + w * (v_cond - v_uncond)``.
Both caches receive the same commits and every keep set, so they hold the same tokens; policies see the
conditional one (``session.caches`` lists both). A LongLive re-cache re-encodes the conditional cache only
(the unconditional branch's prompt does not switch).

A policy may return a :class:`~cachepolicy.policy.PruneRequest` from ``after_step`` or ``candidate_ready``:
the engine removes the requested (unprotected) tokens from the cache for the listed samples and restarts
the chunk from step 1 with the *same* noise, at most ``max_restarts`` times per requesting policy and
sample. The result of the last attempt is kept for every sample (samples that did not ask are recomputed
from an unchanged cache and the same noise, so their result does not change).

A recipe with :class:`~cachepolicy.recipes.Rolling` (Rolling Forcing) replaces steps 1-2 by its joint
rolling window (:mod:`cachepolicy.rolling`); steps 3-5 are the same, per committed block. A recipe's
``rope_mode`` picks the cache's RoPE mode.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pluggy
import torch

from cachepolicy.cache import CacheView, KVCache
from cachepolicy.errors import (
    CompositionError,
    NonFiniteOutputError,
    ParameterError,
    PluginLoadError,
    RolloutConfigError,
)
from cachepolicy.hookspecs import PROJECT_NAME, RolloutSpecs
from cachepolicy.models import ModelAdapter, ModelInfo, Sampler
from cachepolicy.policy import Policy, PruneRequest, Selection, check_unique, compose
from cachepolicy.recipes import Recipe

logger = logging.getLogger(__name__)


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RolloutConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _prompts(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class PromptSwitch:
    """From ``chunk`` on, the samples follow ``prompts`` (one per sample, or one for all).

    Under a recipe with :class:`~cachepolicy.recipes.Recache` (LongLive) the cache is re-encoded under the
    new prompts before ``chunk`` is generated; otherwise only the conditioning changes.
    """

    chunk: int = attrs.field()
    prompts: tuple[str, ...] = attrs.field(converter=_prompts)

    @chunk.validator
    def _check_chunk(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RolloutConfigError(f"a prompt switch needs a chunk index >= 1 (chunk 0 uses the first prompts), "
                                     f"got {value!r}")

    @prompts.validator
    def _check_prompts(self, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value or not all(isinstance(p, str) and p for p in value):
            raise RolloutConfigError(f"a prompt switch needs non-empty prompt strings, got {value!r}")


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
    """

    num_chunks: int = attrs.field(validator=_positive_int)
    prompts: tuple[str, ...] = attrs.field(converter=tuple)
    seeds: tuple[int, ...] = attrs.field(converter=tuple)
    sampler: Sampler | None = None
    synchronize_timing: bool = False
    recipe: Recipe | None = None
    prompt_switches: tuple[PromptSwitch, ...] = attrs.field(default=(), converter=tuple)

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
class StepOutput:
    """What ``after_step`` sees. Tensors are ``[B, C, F, H, W]`` in the model dtype.

    ``active[b]`` is False for a sample that is only being recomputed because another sample of the batch
    restarted the chunk; policies should not re-decide about it. ``view`` is the resident context (the
    chunk being generated is not part of it).
    """

    chunk: int
    attempt: int
    step: int
    num_steps: int
    timestep: float
    sigma: float
    frame_start: int
    x_t: torch.Tensor
    model_output: torch.Tensor
    x0: torch.Tensor
    active: torch.Tensor
    view: CacheView


@attrs.frozen(eq=False)
class Candidate:
    """The chunk's final x0 ``[B, C, F, H, W]`` before commit, with the attempt that produced it."""

    chunk: int
    attempt: int
    frame_start: int
    x0: torch.Tensor
    active: torch.Tensor
    view: CacheView
    restarts: tuple[int, ...]


@attrs.frozen(eq=False)
class RolloutResult:
    """A finished (or stopped) rollout: committed latents ``[B, C, T, H, W]`` on the CPU and the trace."""

    latents: torch.Tensor
    trace: list[dict[str, Any]]
    model: ModelInfo
    policies: tuple[Policy, ...]
    config: RolloutConfig


def noise_seed(seed: int, chunk: int, use: int) -> int:
    """Deterministic 63-bit generator seed for (sample seed, chunk, use)."""
    digest = hashlib.blake2b(f"{seed}:{chunk}:{use}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def call_each(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call every implementation of a hook, in plugin-name order, and return ``(plugin name, result)``.

    Every rollout hook goes through here: unlike a plain pluggy call this keeps ``None`` results aligned
    with the plugin that returned them, and the call order (sorted by policy spec) does not depend on
    the order in which policies were composed.
    """
    impls = sorted(getattr(pm.hook, hook_name).get_hookimpls(), key=lambda impl: impl.plugin_name)
    return [(impl.plugin_name, impl.function(*[kwargs[name] for name in impl.argnames])) for impl in impls]


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
        rope_mode = self.recipe.rope_mode if self.recipe is not None else "absolute"
        self.cache: KVCache = self._new_cache(rope_mode)
        #: classifier-free guidance (``sampler.guidance != 1``): the unconditional branch's own cache, which
        #: holds the same tokens as :attr:`cache` (same commits, same keep sets) with K/V computed under the
        #: empty prompt; None without guidance. Policies see and select on :attr:`cache`.
        self.unconditional_cache: KVCache | None = self._new_cache(rope_mode) if self.sampler.guided else None
        self.conditioning: Any = None
        #: the empty prompt's conditioning for the unconditional branch (encoded by :meth:`check`)
        self.unconditional: Any = None
        #: the conditioning of the first prompts (key -1) and of each prompt switch (key: its chunk), encoded
        #: by :meth:`check`, so a prompt the model cannot take fails before anything is generated or written
        self._encoded: dict[int, Any] | None = None
        self.chunk: int = -1
        self.trace: list[dict[str, Any]] = []
        self.latents: list[torch.Tensor] = []

    def _new_cache(self, rope_mode: str) -> KVCache:
        # adapters written before RoPE modes take no rope_mode; they are only asked for the default
        if rope_mode == "absolute":
            return self.adapter.new_cache(self.batch_size)
        return self.adapter.new_cache(self.batch_size, rope_mode=rope_mode)

    @property
    def caches(self) -> tuple[KVCache, ...]:
        """Every KV cache of the rollout: :attr:`cache`, then :attr:`unconditional_cache` under guidance.
        They always hold the same tokens; a policy that edits cached K/V in place edits each of them."""
        if self.unconditional_cache is None:
            return (self.cache,)
        return (self.cache, self.unconditional_cache)

    def _compact(self, keep: torch.Tensor, pin: torch.Tensor | None = None) -> None:
        """Apply one keep set ``[B, S]`` to every cache (they stay token for token aligned)."""
        for cache in self.caches:
            cache.compact(keep, pin=pin)

    # -------------------------------------------------------------------------------------- checks
    def check(self) -> None:
        """Validate everything that can be validated before the first chunk, and encode every prompt (the
        first ones and those of each switch: a prompt the model refuses fails here)."""
        if self.cache.batch_size != self.batch_size:
            raise RolloutConfigError(
                f"the cache holds {self.cache.batch_size} samples but the rollout has {self.batch_size}"
            )
        for policy in self.policies:
            policy.check_compatible(self.model)
        num_frames = self.config.num_chunks * self.model.frames_per_chunk
        if self.recipe is not None:
            if self.recipe.restart is not None:
                self.recipe.restart.check(self.model.frames_per_chunk)
            if self.recipe.rolling is not None:
                self.recipe.rolling.check(self.model.frames_per_chunk, len(self.sampler.sigmas()))
            cache_mode = getattr(self.cache, "rope_mode", "absolute")
            if cache_mode != self.recipe.rope_mode:
                raise RolloutConfigError(
                    f"recipe {self.recipe.name!r} needs a cache with rope_mode={self.recipe.rope_mode!r}, the "
                    f"adapter gave {cache_mode!r}"
                )
            num_frames = self.recipe.max_rope_frames(num_frames)
        self.adapter.check_rollout(num_frames, self.batch_size)
        if self._encoded is None:
            encoded = {-1: self.adapter.encode_prompts(list(self.config.prompts))}
            for switch in self.config.prompt_switches:
                prompts = list(switch.prompts) * (self.batch_size if len(switch.prompts) == 1 else 1)
                encoded[switch.chunk] = self.adapter.encode_prompts(prompts)
            self._encoded = encoded
            if self.sampler.guided:
                self.unconditional = self.adapter.encode_prompts([""] * self.batch_size)

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> RolloutResult:
        """Generate ``config.num_chunks`` chunks. On error the latents and trace so far stay on the session."""
        self.check()
        self.conditioning = self._encoded[-1]
        call_each(self.pm, "cachepolicy_session_start", session=self)
        try:
            if self.recipe is not None and self.recipe.rolling is not None:
                from cachepolicy.rolling import run_rolling

                run_rolling(self)
            else:
                chunks = range(self.config.num_chunks)
                if self.progress:
                    from tqdm.auto import tqdm

                    chunks = tqdm(chunks, desc="chunks", unit="chunk")
                for chunk in chunks:
                    self._run_chunk(chunk)
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

    # ------------------------------------------------------------------------------------- internals
    def _noise(self, chunk: int, uses: int) -> list[torch.Tensor]:
        model = self.model
        shape = (model.latent_channels, model.frames_per_chunk, model.latent_height, model.latent_width)
        device, dtype = self.cache.device, self.cache.dtype
        noises = []
        for use in range(uses):
            per_sample = []
            for seed in self.config.seeds:
                generator = torch.Generator("cpu").manual_seed(noise_seed(seed, chunk, use))
                per_sample.append(torch.randn(shape, generator=generator, dtype=torch.float32))
            noises.append(torch.stack(per_sample).to(device=device, dtype=dtype))
        return noises

    def _rope_start(self, chunk: int, frame_start: int) -> int:
        restart = self.recipe.restart if self.recipe is not None else None
        if restart is None:
            return frame_start
        return frame_start - restart.origin(chunk, self.model.frames_per_chunk)

    def _forward(self, latent: torch.Tensor, timestep: float | torch.Tensor, frame_start: int, chunk: int,
                 commit: bool, timer: list[float], rope_start: int | None = None, **keys: Any) -> torch.Tensor:
        """One adapter forward; ``timestep`` is one value or a ``[B, F]`` tensor; ``keys`` (``visible``,
        ``rope_positions``) are passed on when not None."""
        if isinstance(timestep, torch.Tensor):
            timesteps = timestep
        else:
            timesteps = torch.full((self.batch_size, latent.shape[2]), float(timestep))
        extra = {name: value for name, value in keys.items() if value is not None}
        sync = self.config.synchronize_timing and self.cache.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.cache.device)
        start = time.perf_counter()
        rope_start = self._rope_start(chunk, frame_start) if rope_start is None else rope_start
        out = self.adapter.forward(latent, timesteps, frame_start, chunk, self.cache, self.conditioning, commit,
                                   rope_start=rope_start, **extra)
        if self.unconditional_cache is not None:
            uncond = self.adapter.forward(latent, timesteps, frame_start, chunk, self.unconditional_cache,
                                          self.unconditional, commit, rope_start=rope_start, **extra)
            if not commit:  # v = v_uncond + w * (v_cond - v_uncond), in float32 at least
                wide = torch.promote_types(out.dtype, torch.float32)
                out = (uncond.to(wide) + self.sampler.guidance * (out.to(wide) - uncond.to(wide))).to(out.dtype)
        if sync:
            torch.cuda.synchronize(self.cache.device)
        timer[0] += time.perf_counter() - start
        return out

    def _run_chunk(self, chunk: int) -> None:
        started = time.perf_counter()
        self.chunk = chunk
        model, sampler = self.model, self.sampler
        frames = model.frames_per_chunk
        frame_start = chunk * frames
        sigmas = sampler.sigmas()
        timesteps = sampler.timesteps()
        noises = self._noise(chunk, len(sigmas) + 1)  # initial noise, re-noising per step, context noise
        forward_time = [0.0]
        recipe_record = self._recipe_prelude(chunk, frame_start, forward_time)
        call_each(self.pm, "cachepolicy_chunk_start", session=self, chunk=chunk)

        restarts: dict[str, list[int]] = {p.spec: [0] * self.batch_size for p in self.policies}
        pruned_by: dict[str, int] = {}
        active = torch.ones(self.batch_size, dtype=torch.bool)
        attempt = 0
        while True:
            x = noises[0]
            request_made = False
            x0 = x
            for step, sigma in enumerate(sigmas):
                velocity = self._forward(x, timesteps[step], frame_start, chunk, False, forward_time)
                x0 = (x.double() - sigma * velocity.double()).to(x.dtype)
                output = StepOutput(chunk, attempt, step, len(sigmas), timesteps[step], sigma, frame_start, x,
                                    velocity, x0, active, self.cache.view())
                results = call_each(self.pm, "cachepolicy_after_step", session=self, step=output)
                active_next = self._apply_prune_requests(results, restarts, pruned_by)
                if active_next is not None:
                    active, request_made = active_next, True
                    break
                if step + 1 < len(sigmas):
                    nxt = sigmas[step + 1]
                    if sampler.noise == "fresh":
                        x = ((1.0 - nxt) * x0.float() + nxt * noises[step + 1].float()).to(x.dtype)
                    else:  # re-noise with the predicted noise: the Euler step of the flow ODE
                        x = (x.double() + (nxt - sigma) * velocity.double()).to(x.dtype)
            if request_made:
                attempt += 1
                continue
            candidate = Candidate(chunk, attempt, frame_start, x0, active, self.cache.view(),
                                  self._retries_per_sample(restarts))
            results = call_each(self.pm, "cachepolicy_candidate_ready", session=self, candidate=candidate)
            active_next = self._apply_prune_requests(results, restarts, pruned_by)
            if active_next is None:
                break
            active = active_next
            attempt += 1

        self._commit_chunk(chunk, candidate, noises[-1], attempt, restarts, pruned_by, recipe_record, forward_time,
                           started)

    def _commit_chunk(self, chunk: int, candidate: Candidate, context_noise: torch.Tensor, attempt: int,
                      restarts: dict[str, list[int]], pruned_by: dict[str, int], recipe_record: dict[str, Any],
                      forward_time: list[float], started: float, visible: torch.Tensor | None = None) -> None:
        """Steps 3-5 for a finished chunk: ``before_commit``, the context pass (attending to ``visible``
        resident tokens, None: all), selection and compaction, the trace record, ``chunk_end``."""
        sampler, frames, frame_start = self.sampler, self.model.frames_per_chunk, candidate.frame_start
        latent = candidate.x0
        rewrites = [(name, out) for name, out in
                    call_each(self.pm, "cachepolicy_before_commit", session=self, candidate=candidate)
                    if out is not None]
        if len(rewrites) > 1:
            raise CompositionError(
                f"policies {', '.join(n for n, _ in rewrites)} all rewrite the latent of chunk {chunk}; "
                f"compose at most one latent-rewriting policy"
            )
        if rewrites:
            latent = rewrites[0][1]
            if latent.shape != candidate.x0.shape:
                raise CompositionError(
                    f"policy {rewrites[0][0]} returned a latent of shape {tuple(latent.shape)}, "
                    f"expected {tuple(candidate.x0.shape)}"
                )
        if not bool(torch.isfinite(latent).all()):
            raise NonFiniteOutputError(chunk, f"latent frames {frame_start}..{frame_start + frames - 1}")

        # context pass: commit the clean chunk's K/V
        context = latent
        if sampler.context_noise > 0:
            s = sampler.context_noise / 1000.0
            context = ((1.0 - s) * latent.float() + s * context_noise.float()).to(latent.dtype)
        self._forward(context, sampler.context_noise, frame_start, chunk, True, forward_time, visible=visible)

        view = self.cache.view()
        selections: dict[str, Selection | None] = dict(
            call_each(self.pm, "cachepolicy_select", session=self, view=view))
        resolution = compose(selections, view.valid)
        self._compact(resolution.keep, pin=resolution.protected)
        call_each(self.pm, "cachepolicy_after_compaction", session=self, chunk=chunk)

        self.latents.append(latent.detach().to("cpu"))
        dropped = dict(resolution.dropped_by)
        for name, count in pruned_by.items():
            dropped[name] = dropped.get(name, 0) + count
        record: dict[str, Any] = {
            "chunk": chunk,
            "frames": [frame_start, frame_start + frames],
            "cache_tokens": self.cache.max_length,
            "cache_tokens_per_sample": list(self.cache.lengths),
            "dropped_tokens": dropped,
            "retries": attempt,
            "retries_per_sample": list(self._retries_per_sample(restarts)),
            "cache_bytes": sum(cache.nbytes() for cache in self.caches),
            **recipe_record,
        }
        for name, extra in call_each(self.pm, "cachepolicy_chunk_end", session=self, chunk=chunk):
            if not extra:
                continue
            clash = set(extra) & set(record)
            if clash:
                raise CompositionError(f"policy {name} writes trace fields {sorted(clash)} that are already set")
            record.update(extra)
        seconds = time.perf_counter() - started
        record["seconds"] = seconds
        record["forward_seconds"] = forward_time[0]
        self.trace.append(record)
        logger.debug("chunk %d: %s", chunk, record)
        if self.on_chunk is not None:
            self.on_chunk(record)

    def _recipe_prelude(self, chunk: int, frame_start: int, timer: list[float]) -> dict[str, Any]:
        """Before ``chunk`` is denoised: a recipe's restart (CausVid) and a prompt switch, with a re-cache
        under a recipe that has one (LongLive). Returns trace fields."""
        record: dict[str, Any] = {}
        frames = self.model.frames_per_chunk
        restart = self.recipe.restart if self.recipe is not None else None
        if restart is not None and restart.restarts_at(chunk, frames):
            # a new rollout: empty cache, the last generated frames committed at RoPE position 0
            overlap = torch.cat(self.latents, dim=2)[:, :, -restart.overlap_frames:]
            overlap = overlap.to(device=self.cache.device, dtype=self.cache.dtype)
            for cache in self.caches:
                cache.clear()
            self._forward(overlap, self.sampler.context_noise, frame_start - restart.overlap_frames, chunk - 1,
                          True, timer, rope_start=0)
            record["restart_overlap_frames"] = [frame_start - restart.overlap_frames, frame_start]
        switch = next((s for s in self.config.prompt_switches if s.chunk == chunk), None)
        if switch is not None:
            prompts = list(switch.prompts) * (self.batch_size if len(switch.prompts) == 1 else 1)
            self.conditioning = self._encoded[switch.chunk]
            record["prompt_switch"] = prompts
            recache = self.recipe.recache if self.recipe is not None else None
            if recache is not None:
                first, count = recache.frames(frame_start)
                if count > 0:
                    latent = torch.cat(self.latents, dim=2)[:, :, first:first + count]
                    latent = latent.to(device=self.cache.device, dtype=self.cache.dtype)
                    timesteps = torch.full((self.batch_size, count), float(self.sampler.context_noise))
                    start = time.perf_counter()
                    # the conditional cache only: the unconditional branch's prompt ("") does not switch
                    replaced = self.adapter.reencode(latent, timesteps, first, self.cache, self.conditioning,
                                                     rope_start=self._rope_start(chunk, first))
                    timer[0] += time.perf_counter() - start
                    record["recached_frames"] = [first, first + count]
                    record["recached_tokens"] = replaced
        return record

    def _retries_per_sample(self, restarts: dict[str, list[int]]) -> tuple[int, ...]:
        """Restarts of the current chunk per sample (the most any one policy caused)."""
        return tuple(max((counts[b] for counts in restarts.values()), default=0) for b in range(self.batch_size))

    def _apply_prune_requests(self, results: list[tuple[str, Any]], restarts: dict[str, list[int]],
                              pruned_by: dict[str, int]) -> torch.Tensor | None:
        """Apply prune requests; return the samples that restart, or None when nothing restarts."""
        requests = [(name, req) for name, req in results if req is not None]
        if not requests:
            return None
        view = self.cache.view()
        protected = self._protected(view)
        restart = torch.zeros(self.batch_size, dtype=torch.bool)
        drop = torch.zeros_like(view.valid)
        for name, request in requests:
            if not isinstance(request, PruneRequest):
                raise ParameterError(f"policy {name} returned {type(request).__name__}, expected PruneRequest")
            if request.drop.shape != view.valid.shape:
                raise ParameterError(
                    f"policy {name}: PruneRequest.drop has shape {tuple(request.drop.shape)}, "
                    f"the cache view is {tuple(view.valid.shape)}"
                )
            counts = restarts[name]
            allowed = torch.tensor([bool(request.samples[b]) and counts[b] < request.max_restarts
                                    for b in range(self.batch_size)])
            if not bool(allowed.any()):
                logger.debug("chunk %d: %s asked to restart past its bound (%d)", self.chunk, name,
                             request.max_restarts)
                continue
            for b in range(self.batch_size):
                if allowed[b]:
                    counts[b] += 1
            mask = request.drop.to(view.valid.device) & allowed.to(view.valid.device).unsqueeze(1)
            removed = mask & view.valid & ~protected
            pruned_by[name] = pruned_by.get(name, 0) + int(removed.sum())
            drop |= removed
            restart |= allowed
            logger.info("chunk %d: %s prunes %d tokens and restarts samples %s (%s)", self.chunk, name,
                        int(removed.sum()), restart.nonzero().squeeze(1).tolist(), request.reason)
        if not bool(restart.any()):
            return None
        self._compact(view.valid & ~drop)
        return restart

    def _protected(self, view: CacheView) -> torch.Tensor:
        """Tokens that some policy protects (``select`` must be a pure function of session and view)."""
        protect = torch.zeros_like(view.valid)
        for _, selection in call_each(self.pm, "cachepolicy_select", session=self, view=view):
            if selection is not None and selection.protect is not None:
                protect |= selection.protect
        return protect


def rollout(adapter: ModelAdapter, policies: Sequence[Policy], config: RolloutConfig, **kwargs: Any) -> RolloutResult:
    """Run one rollout (see :class:`Session`)."""
    return Session(adapter, policies, config, **kwargs).run()
