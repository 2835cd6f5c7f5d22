"""Inference recipes: what each autoregressive system's loop does around the per-chunk denoising.

The engine runs Self Forcing's per-chunk loop (see :mod:`cachepolicy.engine`). A :class:`Recipe` names a
system and fixes the rest of its inference, as its repository does it:

* its sampler (steps, shift, warping, context noise);
* its cache policies (composed with the user's; a user policy of the same name replaces the recipe's);
* :class:`Recache`: LongLive's KV re-cache when the prompt switches mid-video;
* :class:`Restart`: CausVid's long-video restarts, where each new rollout starts from the last frames of
  the previous one at RoPE position 0;
* :class:`Rolling`: Rolling Forcing's joint rolling window (a different loop, :mod:`cachepolicy.rolling`);
* :class:`Stagger`: SkyReels-V2's diffusion forcing: blocks denoised jointly at staggered steps with
  diffusers' UniPC solver (a different loop, :mod:`cachepolicy.stagger`);
* the cache's RoPE mode (``"raw"`` when the recipe re-rotates cached keys).

Built-in recipes (``cachepolicy recipes`` lists them; semantics and sources in docs "Recipes"):

``self-forcing``
    Self Forcing (arXiv 2506.08009), ``configs/self_forcing_dmd.yaml`` at commit 33593df: 3 frames per
    chunk, steps 1000/750/500/250 warped with shift 5 through the float32 training table (the model is
    fed 1000, 937.5, 833.3333129882812, 625, as the official code feeds it), context noise 0, global
    attention (its cache holds 21 frames, the trained length; compose a window to go further).
``causvid``
    CausVid (arXiv 2412.07772), ``configs/wan_causal_dmd.yaml`` and
    ``minimal_inference/longvideo_autoregressive_inference.py`` at ca21150: unwarped steps 1000/757/522
    with sigmas from the shift-8 training table, no eviction, rollouts of 21 frames restarted with an
    overlap of 3 frames.
``longlive``
    LongLive (arXiv 2509.22622), ``configs/longlive_inference.yaml`` and
    ``pipeline/interactive_causal_inference.py`` at 7add41d: Self Forcing's sampler, a 12-frame attention
    window holding a 3-frame sink (``attention-sink:frames=3`` + ``sliding-window:frames=6``), and a KV
    re-cache of the recent frames under the new prompt at each prompt switch.

``rolling-forcing``
    Rolling Forcing (arXiv 2509.25161), ``configs/rolling_forcing_dmd.yaml``,
    ``pipeline/rolling_forcing_inference.py`` and ``wan/modules/causal_model.py`` at a1477d0: steps
    1000/800/600/400/200 warped with shift 5 through the float32 training table, a rolling window of 5
    blocks denoised jointly (one block per step), a 3-frame anchor re-rotated to sit before the working
    cache, 21 attended frames.
``skyreels``
    SkyReels-V2 diffusion forcing as diffusers' ``SkyReelsV2DiffusionForcingPipeline`` (0.42.1) runs it: UniPC
    (order 2, predictor-corrector) over 30 flow steps with shift 8, integer timesteps to the model,
    classifier-free guidance 6 against the empty prompt, ``ar_step=5`` between blocks of one chunk, and
    long videos in iterations of 25 latent frames (``base_num_frames=97``) that restart from the last
    5 frames (``overlap_history=17``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from cachepolicy.errors import ParameterError, RolloutConfigError, UnknownNameError
from cachepolicy.models import ModelInfo, Sampler
from cachepolicy.noise import NoiseSource, OfficialNoise

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UniPCMultistepScheduler


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ParameterError(f"{type(instance).__name__}.{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class Recache:
    """LongLive's KV re-cache at a prompt switch (``_recache_after_switch``, ``global_sink=True``).

    At the first chunk after a switch, starting at latent frame ``s``, the frames that LongLive's physical
    cache will keep attending to are run once more, clean, at the context noise, under the *new* prompt,
    bidirectionally among themselves: frames ``[0, s)`` when ``s <= window_frames`` (the sink included),
    else the ``window_frames - sink_frames`` frames before ``s``, which also see the sink's old K/V (kept:
    it was encoded under the first prompt). Resident tokens of those frames get the new K/V; frames no
    longer resident are recomputed only as context of the others.

    Attributes:
        window_frames: LongLive's ``local_attn_size`` (latent frames, sink and own chunk included).
        sink_frames: LongLive's ``sink_size`` (latent frames).
    """

    window_frames: int = attrs.field(default=12, validator=_positive)
    sink_frames: int = attrs.field(default=3)

    @sink_frames.validator
    def _check_sink(self, attribute: attrs.Attribute, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.window_frames:
            raise ParameterError(
                f"Recache.sink_frames must be an integer in [0, window_frames={self.window_frames}), got {value!r}"
            )

    def frames(self, frame_start: int) -> tuple[int, int]:
        """``(first frame, number of frames)`` re-encoded before the chunk that starts at ``frame_start``."""
        if frame_start <= self.window_frames:
            return 0, frame_start
        count = self.window_frames - self.sink_frames
        return frame_start - count, count


@attrs.frozen
class Restart:
    """CausVid's long-video restarts (``longvideo_autoregressive_inference.py``).

    The first rollout generates ``rollout_frames`` latent frames at RoPE positions ``0 ..``. Each later
    rollout clears the cache, commits the last ``overlap_frames`` generated frames once (clean, context
    noise) at positions ``0 .. overlap_frames - 1``, and generates ``rollout_frames - overlap_frames`` new
    frames after them, so RoPE positions never pass ``rollout_frames - 1``. The overlap frames are not
    generated again (the output has no duplicates). CausVid re-encodes the first overlap frame from
    decoded pixels with its VAE; here the latent is reused as it is (no VAE round trip).

    Attributes:
        rollout_frames: latent frames per rollout (a multiple of the chunk length).
        overlap_frames: latent frames carried into the next rollout (one chunk).
    """

    rollout_frames: int = attrs.field(default=21, validator=_positive)
    overlap_frames: int = attrs.field(default=3, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.overlap_frames >= self.rollout_frames:
            raise ParameterError(
                f"Restart.overlap_frames={self.overlap_frames} must be smaller than "
                f"rollout_frames={self.rollout_frames}"
            )

    def check(self, frames_per_chunk: int) -> None:
        """Raise :class:`RolloutConfigError` unless rollouts are whole chunks and the overlap is one chunk."""
        if self.rollout_frames % frames_per_chunk or self.overlap_frames != frames_per_chunk:
            raise RolloutConfigError(
                f"restarts need rollout_frames (got {self.rollout_frames}) to be a multiple of the model's "
                f"{frames_per_chunk} frames per chunk and overlap_frames (got {self.overlap_frames}) to be "
                f"exactly one chunk ({frames_per_chunk} frames)"
            )

    def origin(self, chunk: int, frames_per_chunk: int) -> int:
        """Absolute latent frame at RoPE position 0 for ``chunk``."""
        first = self.rollout_frames // frames_per_chunk
        if chunk < first:
            return 0
        per_rollout = (self.rollout_frames - self.overlap_frames) // frames_per_chunk
        start_chunk = first + (chunk - first) // per_rollout * per_rollout
        return start_chunk * frames_per_chunk - self.overlap_frames

    def restarts_at(self, chunk: int, frames_per_chunk: int) -> bool:
        """True when ``chunk`` is the first new chunk of a later rollout."""
        first = self.rollout_frames // frames_per_chunk
        per_rollout = (self.rollout_frames - self.overlap_frames) // frames_per_chunk
        return chunk >= first and (chunk - first) % per_rollout == 0


@attrs.frozen
class Rolling:
    """Rolling Forcing's joint rolling window (``pipeline/rolling_forcing_inference.py``).

    With ``W`` denoising steps, window ``w`` holds blocks ``max(0, w-W+1) .. min(nb-1, w)``, block ``b`` at
    step ``w - b``; one model call denoises the whole window bidirectionally. Only the window's oldest
    (final) block is committed. Keys (frames): the anchor (the first ``anchor_frames`` frames) re-rotated to
    sit just before the working cache, the working cache (the committed blocks before the window, as many
    as fit in ``max_attention_frames`` next to the anchor and the window), and the window. The context pass
    of block ``f`` sees the last ``max_attention_frames`` frames ending with ``f`` (the anchor at its own
    positions while it is among them). See docs "Recipes".

    Attributes:
        anchor_frames: frames kept as the anchor (Rolling Forcing: the first block, 3 frames).
        max_attention_frames: frames a query attends to at most (Rolling Forcing: 21).
    """

    anchor_frames: int = attrs.field(default=3, validator=_positive)
    max_attention_frames: int = attrs.field(default=21, validator=_positive)

    def check(self, frames_per_chunk: int, num_steps: int) -> None:
        """Raise :class:`RolloutConfigError` unless the anchor is one chunk and a full window fits."""
        if self.anchor_frames != frames_per_chunk:
            raise RolloutConfigError(
                f"Rolling.anchor_frames={self.anchor_frames} must be one chunk ({frames_per_chunk} frames): the "
                f"anchor is the first block"
            )
        if self.max_attention_frames < (num_steps + 1) * frames_per_chunk:
            raise RolloutConfigError(
                f"Rolling.max_attention_frames={self.max_attention_frames} cannot hold the anchor and a window of "
                f"{num_steps} blocks of {frames_per_chunk} frames"
            )

    def working_blocks(self, first: int, num_blocks: int, frames_per_chunk: int) -> int:
        """Committed blocks before the window (after the anchor) that a window call with first block
        ``first`` and ``num_blocks`` blocks attends to."""
        room = (self.max_attention_frames - num_blocks * frames_per_chunk - self.anchor_frames) // frames_per_chunk
        return max(0, min(first - 1, room))


#: diffusers' ``UniPCMultistepScheduler`` as SkyReels-V2's diffusion-forcing pipelines are built (diffusers'
#: ``scripts/convert_skyreelsv2_to_diffusers.py``: flow prediction, flow sigmas, 1000 training steps; the shift
#: is set by :attr:`Stagger.shift`, as the pipeline's documentation does with ``from_config(flow_shift=8.0)``).
#: The solver settings are diffusers' defaults, pinned here: order 2 (``bh2``) with the UniC corrector after
#: every step but the first, first order at the last step, the last step to sigma 0.
UNIPC_CONFIG: dict[str, Any] = {
    "prediction_type": "flow_prediction",
    "num_train_timesteps": 1000,
    "use_flow_sigmas": True,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": [],
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}


def _non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ParameterError(f"{type(instance).__name__}.{attribute.name} must be an integer >= 0, got {value!r}")


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"Stagger.shift must be a number, got {value!r}") from None


def _finite_positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ParameterError(f"{type(instance).__name__}.{attribute.name} must be a finite number > 0, got {value!r}")


@attrs.frozen
class Stagger:
    """SkyReels-V2's diffusion forcing (diffusers' ``SkyReelsV2DiffusionForcingPipeline``; docs "Recipes").

    Blocks of one chunk are denoised jointly, each ``ar_step`` steps behind the one before, in one model call
    per step on the blocks being denoised (per-frame integer timesteps, block-causal inside the call); each
    block has its own UniPC solver state (diffusers' ``UniPCMultistepScheduler``, :data:`UNIPC_CONFIG`). A
    block is committed (a clean context pass at timestep 0) when its last step is done: every later call
    attends to it there, as the pipeline's full-sequence call attends to the finished block fed clean at
    timestep 0. Long videos: the recipe's :class:`Restart` (the pipeline's ``base_num_frames`` and
    ``overlap_history``, in latent frames).

    Attributes:
        steps: UniPC steps per block (the pipeline's ``num_inference_steps``).
        shift: the flow shift of the sigmas, ``shift*s / (1 + (shift-1)*s)`` (``flow_shift``).
        ar_step: steps a block lags behind the block before it (0: all blocks together).
    """

    steps: int = attrs.field(default=30, validator=_positive)
    shift: float = attrs.field(default=8.0, converter=_to_float, validator=_finite_positive)
    ar_step: int = attrs.field(default=5, validator=_non_negative)

    def scheduler(self) -> UniPCMultistepScheduler:
        """A fresh UniPC solver with its ``steps`` timesteps set (one per block, as the pipeline deep-copies one
        per frame)."""
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler(**UNIPC_CONFIG, flow_shift=self.shift)
        scheduler.set_timesteps(self.steps, device="cpu")
        return scheduler

    def timesteps(self) -> list[int]:
        """The integer timesteps in ``[0, 1000)`` the model is fed, one per step (UniPC's int64 timesteps)."""
        return [int(t) for t in self.scheduler().timesteps]

    def sigmas(self) -> list[float]:
        """UniPC's float32 sigmas, one per step and the final 0."""
        return [float(s) for s in self.scheduler().sigmas]

    def sampler(self, guidance: float = 6.0) -> Sampler:
        """The :class:`Sampler` that goes with this solver: the model's integer timesteps, context noise 0,
        ``guidance`` (the sampler's sigmas are not used: UniPC's are)."""
        return Sampler(denoising_steps=tuple(float(t) for t in self.timesteps()), shift=self.shift, warp=False,
                       table=True, context_noise=0.0, guidance=guidance)

    def counters(self, num_blocks: int, ready_blocks: int = 0) -> list[tuple[int, ...]]:
        """Per model call, each block's step counter (``generate_timestep_matrix``'s ``step_index``).

        ``0``: not started; ``i`` in ``1 .. steps``: the block's step ``i-1`` (timestep ``timesteps()[i-1]``);
        ``steps + 1``: finished. A call denoises the blocks whose counter changed and is at most ``steps``.
        Block 0 advances by one per call; block ``b`` is ``ar_step`` behind block ``b-1`` while that one still
        had steps left in the previous call, else advances by one. ``ready_blocks`` leading blocks are finished from the start
        (a long video's overlap). Calls are made until every block has had its last step.
        """
        last = self.steps
        previous = [last + 1] * ready_blocks + [0] * (num_blocks - ready_blocks)
        rows: list[tuple[int, ...]] = []
        while not all(counter >= last for counter in previous):
            row: list[int] = []
            for b in range(num_blocks):
                if b == 0 or previous[b - 1] >= last:
                    row.append(previous[b] + 1)
                else:
                    row.append(row[b - 1] - self.ar_step)
            previous = [min(max(counter, 0), last + 1) for counter in row]
            rows.append(tuple(previous))
        return rows

    def window_blocks(self, num_blocks: int) -> int:
        """The most blocks one call denoises in a run of ``num_blocks`` blocks."""
        widest, previous = 0, [0] * num_blocks
        for row in self.counters(num_blocks):
            widest = max(widest, sum(1 for a, b in zip(previous, row) if a != b and b <= self.steps))
            previous = list(row)
        return widest

    def check(self, model: ModelInfo, sampler: Sampler, prompt_switches: tuple[Any, ...]) -> None:
        """Raise :class:`RolloutConfigError` unless the model, the sampler and the rollout fit the loop."""
        frames = model.frames_per_chunk
        if model.causal_block_frames != frames:
            raise RolloutConfigError(
                f"the skyreels stagger denoises several chunks in one model call, block-causally (a frame sees "
                f"its own chunk and the earlier ones), as SkyReels' pipeline does with causal_block_size: the "
                f"model must attend in causal blocks of one chunk ({frames} frames), but its calls attend "
                + ("bidirectionally" if model.causal_block_frames is None
                   else f"in causal blocks of {model.causal_block_frames} frames")
                + f"; load it with causal_block_size={frames} (--model-option causal_block_size={frames})"
            )
        if sampler.context_noise != 0:
            raise RolloutConfigError(
                f"the skyreels stagger feeds finished blocks clean at timestep 0, as SkyReels' pipeline does; "
                f"a sampler with context_noise={sampler.context_noise:g} is not allowed (use 0)"
            )
        wanted = [float(t) for t in self.timesteps()]
        if list(sampler.timesteps()) != wanted:
            raise RolloutConfigError(
                f"the skyreels stagger steps with UniPC ({self.steps} steps, shift {self.shift:g}), which feeds "
                f"the model timesteps {[int(t) for t in wanted]}; the sampler feeds "
                f"[{', '.join(f'{t:g}' for t in sampler.timesteps())}]: use Stagger(...).sampler(guidance) for the "
                f"sampler, and change steps and shift in the recipe's Stagger"
            )
        if prompt_switches:
            raise RolloutConfigError("prompt switches are not supported with the skyreels stagger (blocks of "
                                     "several prompts would be denoised in one call)")

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "solver": "UniPCMultistepScheduler", "solver_config": dict(UNIPC_CONFIG),
                "timesteps": self.timesteps(), "sigmas": self.sigmas()}


@attrs.frozen
class Recipe:
    """A system's inference loop around the engine.

    Attributes:
        name: the name used with ``--recipe``.
        summary: one line for listings.
        source: where the defaults were read (repository, commit, files).
        sampler: the system's sampler; None keeps the model's own.
        policies: policy specs the system always uses (composed with the user's; a user policy of the
            same name replaces the recipe's).
        recache: re-cache at prompt switches (LongLive), or None (the prompt just changes).
        restart: long-video restarts (CausVid), or None.
        rolling: Rolling Forcing's joint rolling window, or None (the engine's per-chunk loop).
        stagger: SkyReels-V2's staggered joint denoising with UniPC, or None.
        rope_mode: the cache's RoPE mode, ``"absolute"`` or ``"raw"`` (keys rotated on read).
        noise_order: the draw order of the system's official script (:class:`~cachepolicy.noise.OfficialNoise`),
            or None.
    """

    name: str
    summary: str
    source: str = ""
    sampler: Sampler | None = None
    policies: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    recache: Recache | None = None
    restart: Restart | None = None
    rolling: Rolling | None = None
    stagger: Stagger | None = None
    rope_mode: str = "absolute"
    noise_order: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.recache is not None and self.restart is not None:
            raise ParameterError(f"recipe {self.name!r}: a recipe cannot both re-cache and restart")
        if self.rolling is not None and (self.recache is not None or self.restart is not None):
            raise ParameterError(f"recipe {self.name!r}: a rolling window cannot be combined with a re-cache "
                                 f"or restarts")
        if self.stagger is not None and (self.rolling is not None or self.recache is not None):
            raise ParameterError(f"recipe {self.name!r}: a stagger cannot be combined with a rolling window or a "
                                 f"re-cache")
        if self.rope_mode not in ("absolute", "raw"):
            raise ParameterError(f"recipe {self.name!r}: rope_mode must be 'absolute' or 'raw', got {self.rope_mode!r}")
        if self.rolling is not None and self.rope_mode != "raw":
            raise ParameterError(f"recipe {self.name!r}: a rolling window re-rotates its anchor and needs "
                                 f"rope_mode='raw'")

    def official_noise(self, seed: int | None = None) -> NoiseSource:
        """The noise of the system's official script from one generator seeded with ``seed`` (None: the
        rollout's first seed): ``RolloutConfig(noise=recipe.official_noise())``."""
        if self.noise_order is None:
            raise ParameterError(f"recipe {self.name!r} names no official noise order")
        restart = self.restart
        if restart is None:
            return OfficialNoise(self.noise_order, seed, rollout_frames=None if self.stagger is not None else 21)
        return OfficialNoise(self.noise_order, seed, rollout_frames=restart.rollout_frames,
                             overlap_frames=restart.overlap_frames)

    def max_rope_frames(self, num_frames: int) -> int:
        """The largest RoPE frame position + 1 that a rollout of ``num_frames`` latent frames uses."""
        if self.restart is None:
            return num_frames
        return min(num_frames, self.restart.rollout_frames)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sampler": None if self.sampler is None else self.sampler.to_json(),
            "policies": list(self.policies),
            "recache": None if self.recache is None else attrs.asdict(self.recache),
            "restart": None if self.restart is None else attrs.asdict(self.restart),
            "rolling": None if self.rolling is None else attrs.asdict(self.rolling),
            "stagger": None if self.stagger is None else self.stagger.to_json(),
            "rope_mode": self.rope_mode,
            "noise_order": self.noise_order,
        }


#: the model timesteps of SkyReels' 30 UniPC steps with shift 8 (``Stagger().timesteps()`` with diffusers 0.42.1),
#: written out so that importing the recipes does not import diffusers; the tests check they are UniPC's
SKYREELS_TIMESTEPS = (999, 995, 991, 986, 981, 975, 969, 963, 956, 949, 941, 932, 923, 912, 901, 889, 875, 859, 842,
                      822, 800, 774, 744, 709, 667, 616, 553, 473, 367, 221)

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="self-forcing",
            summary="Self Forcing: 4 steps warped with shift 5, context noise 0, global attention",
            source="guandeh17/Self-Forcing@33593df configs/self_forcing_dmd.yaml, pipeline/causal_inference.py",
            sampler=Sampler(denoising_steps=(1000, 750, 500, 250), shift=5.0, warp=True, table=True,
                            context_noise=0.0),
            noise_order="self-forcing",
        ),
        Recipe(
            name="causvid",
            summary="CausVid: steps 1000/757/522 (shift-8 table), rollouts of 21 frames restarted with a 3-frame overlap",
            source="tianweiy/CausVid@ca21150 configs/wan_causal_dmd.yaml, "
                   "minimal_inference/longvideo_autoregressive_inference.py",
            sampler=Sampler(denoising_steps=(1000, 757, 522), shift=8.0, warp=False, table=True, context_noise=0.0),
            restart=Restart(rollout_frames=21, overlap_frames=3),
            noise_order="causvid",
        ),
        Recipe(
            name="longlive",
            summary="LongLive: Self Forcing's sampler, 3-frame sink in a 12-frame window, KV re-cache at prompt switches",
            source="NVlabs/LongLive@7add41d configs/longlive_inference.yaml, pipeline/interactive_causal_inference.py",
            sampler=Sampler(denoising_steps=(1000, 750, 500, 250), shift=5.0, warp=True, table=True,
                            context_noise=0.0),
            policies=("attention-sink:frames=3", "sliding-window:frames=6"),
            recache=Recache(window_frames=12, sink_frames=3),
            noise_order="self-forcing",
        ),
        Recipe(
            name="rolling-forcing",
            summary="Rolling Forcing: 5 blocks denoised jointly in a rolling window, re-rotated 3-frame anchor, "
                    "21 attended frames",
            source="TencentARC/RollingForcing@a1477d0 configs/rolling_forcing_dmd.yaml, "
                   "pipeline/rolling_forcing_inference.py, wan/modules/causal_model.py",
            sampler=Sampler(denoising_steps=(1000, 800, 600, 400, 200), shift=5.0, warp=True, table=True,
                            context_noise=0.0),
            policies=("attention-sink:frames=3", "sliding-window:frames=18"),
            rolling=Rolling(anchor_frames=3, max_attention_frames=21),
            rope_mode="raw",
            noise_order="rolling-forcing",
        ),
        Recipe(
            name="skyreels",
            summary="SkyReels-V2 diffusion forcing: 30 UniPC steps (shift 8), guidance 6, blocks denoised jointly "
                    "5 steps apart, iterations of 25 frames restarted from the last 5",
            source="diffusers 0.42.1 pipelines/skyreels_v2/pipeline_skyreels_v2_diffusion_forcing.py, "
                   "scripts/convert_skyreelsv2_to_diffusers.py; SkyworkAI/SkyReels-V2@abed76f generate_video_df.py",
            sampler=Sampler(denoising_steps=SKYREELS_TIMESTEPS, shift=8.0, warp=False, table=True,
                            context_noise=0.0, guidance=6.0),
            stagger=Stagger(steps=30, shift=8.0, ar_step=5),
            restart=Restart(rollout_frames=25, overlap_frames=5),
            noise_order="skyreels",
        ),
    )
}


def get_recipe(name: str | Recipe) -> Recipe:
    """The built-in recipe ``name`` (a :class:`Recipe` is returned as it is); unknown names suggest the
    closest ones."""
    if isinstance(name, Recipe):
        return name
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownNameError("recipe", name, RECIPES) from None


def recipe_specs(recipe: Recipe | None, given_names: set[str]) -> list[str]:
    """The recipe's policy specs whose policy name is not among ``given_names`` (the user's replace them)."""
    if recipe is None:
        return []
    return [spec for spec in recipe.policies if spec.split(":", 1)[0] not in given_names]


def merge_policy_specs(recipe: Recipe | None, specs: list[str]) -> list[str]:
    """The recipe's policies followed by the user's; a user policy of the same name replaces the recipe's."""
    user_names = {term.split(":", 1)[0].strip() for spec in specs for term in spec.split("+")}
    return recipe_specs(recipe, user_names) + list(specs)
