"""The ``skyreels`` recipe against diffusers' own ``SkyReelsV2DiffusionForcingPipeline``.

The reference is the pipeline itself (diffusers 0.42.1), run on the CPU: a tiny ``SkyReelsV2Transformer3DModel``
with every parameter random (``tiny_skyreels_model``, a second instance with the same weights as the
adapter's), no text encoder (``prompt_embeds`` and ``negative_prompt_embeds`` from the adapter's hashed-word
encoder, the empty prompt for the negative one) and no VAE (``output_type="latent"``), one seeded CPU
generator, ``causal_block_size`` = one chunk, its scheduler built as diffusers' conversion script builds the
DF pipelines' (``UniPCMultistepScheduler(prediction_type="flow_prediction", num_train_timesteps=1000,
use_flow_sigmas=True)``, then ``from_config(flow_shift=...)`` as its documentation does). Only the
transformer's weights and the prompt embeddings are shared with the engine. The recipe's latents must equal
the pipeline's within 2e-5, fed either the pipeline's recorded initial noise or the recipe's official noise
order from the same seed.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import attrs
import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

from cachepolicy.adapters.skyreels.adapter import load_tiny_skyreels, tiny_skyreels_model
from cachepolicy.engine import PromptSwitch, RolloutConfig, Session
from cachepolicy.errors import ParameterError, RolloutConfigError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.models import Sampler, parse_sampler
from cachepolicy.noise import NoiseSpec, OfficialNoise, RecordedNoise
from cachepolicy.policy import Policy, PruneRequest, build_policies
from cachepolicy.recipes import SKYREELS_TIMESTEPS, UNIPC_CONFIG, Recipe, Restart, Stagger, get_recipe
from cachepolicy.stagger import iterations

TOLERANCE = 2e-5
F = 3  # tiny-skyreels: causal blocks of 3 frames, one chunk
WEIGHTS = 1
PROMPTS = ("a red fox runs", "a blue bird flies")
SEED = 0

#: the cases run through the pipeline: the stagger over 5 blocks; a long video (two iterations, the second
#: restarting from a one-block overlap); all blocks together (ar_step=0); a batch of two (the pipeline's
#: diffusion-forcing fps embedding only takes a batch of one, so that model has none: inject_sample_info=False)
CASES = {
    "stagger": dict(steps=5, ar_step=2, frames=15, guidance=6.0),
    "long": dict(steps=5, ar_step=2, frames=18, guidance=6.0, base=12, overlap=3),
    "synchronous": dict(steps=4, ar_step=0, frames=9, guidance=6.0),
    "batch": dict(steps=5, ar_step=1, frames=12, guidance=6.0, batch=2, fps_embedding=False),
}


def pipeline_scheduler(shift: float) -> UniPCMultistepScheduler:
    """The DF pipelines' scheduler as diffusers builds it (conversion script), shifted as its docs do."""
    converted = UniPCMultistepScheduler(prediction_type="flow_prediction", num_train_timesteps=1000,
                                        use_flow_sigmas=True)
    return UniPCMultistepScheduler.from_config(converted.config, flow_shift=shift)


def tiny(fps_embedding: bool = True):
    """The adapter over the tiny model (``fps_embedding``: its ``inject_sample_info``)."""
    return load_tiny_skyreels(seed=WEIGHTS, inject_sample_info=fps_embedding)


def run_pipeline(*, steps: int, ar_step: int, frames: int, guidance: float, base: int | None = None,
                 overlap: int | None = None, shift: float = 8.0, seed: int = SEED, batch: int = 1,
                 fps_embedding: bool = True) -> tuple[torch.Tensor, list]:
    """diffusers' pipeline on ``frames`` latent frames (``base``/``overlap``: latent frames of a long video);
    returns its latents ``[B, C, T, H, W]`` and the initial noise of each iteration it drew."""
    model = tiny_skyreels_model(seed=WEIGHTS, inject_sample_info=fps_embedding)
    pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                                              scheduler=pipeline_scheduler(shift))
    pipe.set_progress_bar_config(disable=True)
    encoder = tiny(fps_embedding)
    prompts = list(PROMPTS[:batch])
    draws = []
    prepare = pipe.prepare_latents

    def recording(*args, **kwargs):
        out = prepare(*args, **kwargs)
        draws.append(out[0].clone())
        return out

    pipe.prepare_latents = recording
    long_video = {} if base is None else dict(base_num_frames=4 * (base - 1) + 1,
                                              overlap_history=4 * (overlap - 1) + 1)
    with torch.no_grad():
        out = pipe(prompt=None, prompt_embeds=encoder.encode_prompts(prompts),
                   negative_prompt_embeds=encoder.encode_prompts([""] * batch), height=64, width=64,
                   num_frames=4 * (frames - 1) + 1, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed), output_type="latent", ar_step=ar_step,
                   causal_block_size=F, **long_video)
    return out.frames, draws


def recipe_for(*, steps: int, ar_step: int, guidance: float, base: int | None = None, overlap: int | None = None,
               shift: float = 8.0, **_) -> Recipe:
    """The built-in ``skyreels`` recipe with the case's numbers."""
    stagger = Stagger(steps=steps, shift=shift, ar_step=ar_step)
    return attrs.evolve(get_recipe("skyreels"), stagger=stagger, sampler=stagger.sampler(guidance),
                        restart=None if base is None else Restart(rollout_frames=base, overlap_frames=overlap))


def run_recipe(recipe: Recipe, frames: int, noise=None, policies=(), adapter=None, batch: int = 1,
               fps_embedding: bool = True, **_):
    config = RolloutConfig(num_chunks=frames // F, prompts=PROMPTS[:batch], seeds=(SEED, SEED + 1)[:batch],
                           recipe=recipe, noise=noise if noise is not None else recipe.official_noise(SEED))
    session = Session(adapter or tiny(fps_embedding), list(policies), config)
    return session.run(), session


def recorded_noise(case: dict, draws: list) -> RecordedNoise:
    """The pipeline's initial noise per chunk: iteration 0 holds frames 0..; a later one starts at its overlap."""
    base = case.get("base") or case["frames"]
    news = base - (case.get("overlap") or 0)
    noise = {}
    for chunk in range(case["frames"] // F):
        start = chunk * F
        iteration = 0 if start < base else 1 + (start - base) // news
        origin = 0 if iteration == 0 else base + (iteration - 1) * news - case["overlap"]
        noise[(chunk, 0)] = draws[iteration][:, :, start - origin:start - origin + F]
    return RecordedNoise(noise)


@pytest.fixture(scope="module")
def reference():
    """Pipeline latents and draws per case, computed once."""
    return {name: run_pipeline(**case) for name, case in CASES.items()}


# ------------------------------------------------------------------------------------------ the schedule
@pytest.mark.parametrize("steps", [1, 2, 4, 5])
@pytest.mark.parametrize("ar_step", [0, 1, 2, 3, 7])
def test_counters_are_the_pipelines_timestep_matrix(steps, ar_step):
    stagger = Stagger(steps=steps, ar_step=ar_step)
    template = torch.tensor(stagger.timesteps())
    for blocks in range(1, 7):
        for ready in range(0, min(2, blocks - 1) + 1):
            matrix, index, update, interval = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(
                None, blocks * F, template, blocks * F, ar_step, ready * F, F)
            rows = stagger.counters(blocks, ready)
            assert [tuple(row) for row in index[:, ::F].tolist()] == rows
            previous = [steps + 1] * ready + [0] * (blocks - ready)
            for row, mask in zip(rows, update[:, ::F].tolist()):
                assert [a != b and b <= steps for a, b in zip(previous, row)] == mask
                previous = list(row)
            # every call covers the whole iteration (what lets finished blocks come from a cache)
            assert set(interval) == {(0, blocks * F)}
            if ready == 0:
                assert stagger.window_blocks(blocks) == int(update[:, ::F].sum(dim=1).max())


def test_unipc_is_the_pipelines_and_the_recorded_timesteps():
    stagger = get_recipe("skyreels").stagger
    pipeline = pipeline_scheduler(8.0)
    pipeline.set_timesteps(30)
    ours = stagger.scheduler()
    assert ours.timesteps.tolist() == pipeline.timesteps.tolist() == list(SKYREELS_TIMESTEPS)
    assert torch.equal(ours.sigmas, pipeline.sigmas)
    assert {k: pipeline.config[k] for k in UNIPC_CONFIG} == UNIPC_CONFIG
    assert get_recipe("skyreels").sampler == stagger.sampler(6.0)
    assert get_recipe("skyreels").sampler.timesteps() == [float(t) for t in SKYREELS_TIMESTEPS]


def test_a_block_solver_updated_in_place_is_the_pipelines_per_frame_solvers():
    """The pipeline steps each frame's solver on a view of ``latents`` and writes the result back through it:
    the solver's ``last_sample`` of the first step is then the new latent. One solver per block, updated in
    place, reproduces that bit for bit; the same solver on a fresh tensor (UniPC as meant) does not."""
    template = Stagger(steps=4).scheduler()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, F, 8, 8, generator=generator)
    velocities = [torch.randn(2, 4, F, 8, 8, generator=generator) for _ in range(4)]
    frames = [copy.deepcopy(template) for _ in range(F)]
    block, fresh = copy.deepcopy(template), copy.deepcopy(template)
    pipeline, in_place, plain = x.clone(), x.clone(), x.clone()
    for i, v in enumerate(velocities):
        t = template.timesteps[i]
        for f in range(F):
            pipeline[:, :, f] = frames[f].step(v[:, :, f], t, pipeline[:, :, f], return_dict=False)[0]
        in_place.copy_(block.step(v, t, in_place, return_dict=False)[0])
        plain = fresh.step(v, t, plain, return_dict=False)[0]
    assert torch.equal(in_place, pipeline)
    assert float((plain - pipeline).abs().max()) > 1e-2


def test_iterations_are_the_pipelines_long_video_loop():
    # 18 frames, base 12, overlap 3: frames 0..11, then the overlap chunk 3 + chunks 4, 5
    assert iterations(6, 3, 12, 3) == [(0, 0, 4), (3, 1, 3)]
    assert iterations(6, 3, None, 3) == [(0, 0, 6)]
    assert iterations(4, 3, 12, 3) == [(0, 0, 4)]  # no longer than one iteration
    # SkyReels' 30 s example: 737 frames = 185 latent frames (37 chunks of 5), base 25, overlap 5
    plan = iterations(37, 5, 25, 5)
    assert plan[0] == (0, 0, 5) and plan[1] == (4, 1, 5) and plan[-1] == (32, 1, 5) and len(plan) == 9
    assert sum(count - ready for _, ready, count in plan) == 37


def test_official_noise_is_the_pipelines_initial_draws(reference):
    _, draws = reference["long"]
    source = OfficialNoise("skyreels", SEED, rollout_frames=12, overlap_frames=3)
    assert recipe_for(**CASES["long"]).official_noise(SEED) == source
    stream = source.stream(NoiseSpec((0,), (4, F, 8, 8), "cpu", torch.float32, num_chunks=6, num_steps=5))
    assert torch.equal(stream.draw(0, 0), draws[0][:, :, :3]) and torch.equal(stream.draw(3, 0), draws[0][:, :, 9:])
    assert torch.equal(stream.draw(4, 0), draws[1][:, :, 3:6]) and torch.equal(stream.draw(5, 0), draws[1][:, :, 6:])
    with pytest.raises(ParameterError, match="draws only initial noise.*not use 1 of chunk 0"):
        stream.draw(0, 1)
    with pytest.raises(ParameterError, match="rollout_frames must be a positive integer, got None"):
        OfficialNoise("causvid", 0, rollout_frames=None)


# ------------------------------------------------------------------------------ against the pipeline
@pytest.mark.parametrize("name", list(CASES))
def test_recipe_equals_the_diffusers_pipeline(reference, name):
    case = CASES[name]
    expected, draws = reference[name]
    assert len(draws) == (2 if "base" in case else 1)
    recipe = recipe_for(**case)
    recorded, session = run_recipe(recipe, noise=recorded_noise(case, draws), **case)
    official, _ = run_recipe(recipe, **case)
    worst = float((recorded.latents - expected).abs().max())
    print(f"{name}: max |recipe - pipeline| = {worst:.2g} (recorded noise), "
          f"{float((official.latents - expected).abs().max()):.2g} (official noise); "
          f"peak {float(expected.abs().max()):.3g}")
    assert recorded.latents.shape == expected.shape
    assert worst <= TOLERANCE
    assert float((official.latents - expected).abs().max()) <= TOLERANCE
    if "base" in case:  # the second iteration restarted the cache from its overlap chunk
        assert recorded.trace[4]["restart_overlap_frames"] == [9, 12]


@pytest.mark.parametrize("name,change", [
    ("stagger", dict(ar_step=0)),  # blocks denoised together instead of staggered
    ("stagger", dict(ar_step=3)),
    ("stagger", dict(shift=5.0)),
    ("stagger", dict(guidance=1.0)),
    ("long", dict(base=None)),  # one iteration over all frames instead of restarting from the overlap
])
def test_a_wrong_setting_misses_the_pipeline(reference, name, change):
    case = CASES[name]
    expected, _ = reference[name]
    result, _ = run_recipe(recipe_for(**{**case, **change}), **case)
    assert float((result.latents - expected).abs().max()) > 1e-2


def test_another_seed_misses_the_pipeline(reference):
    case = CASES["stagger"]
    expected, _ = reference["stagger"]
    recipe = recipe_for(**case)
    result, _ = run_recipe(recipe, noise=recipe.official_noise(SEED + 1), **case)
    assert float((result.latents - expected).abs().max()) > 1e-2


# ----------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_value_and_what_is_allowed():
    recipe = recipe_for(**CASES["stagger"])
    bidirectional = load_tiny_skyreels(seed=WEIGHTS, causal_block_size=1, frames_per_chunk=3)
    with pytest.raises(RolloutConfigError, match="attend bidirectionally; load it with causal_block_size=3"):
        run_recipe(recipe, 6, adapter=bidirectional)
    config = dict(num_chunks=2, prompts=PROMPTS[:1], seeds=(0,), recipe=recipe)
    adapter = load_tiny_skyreels(seed=WEIGHTS)
    with pytest.raises(RolloutConfigError, match="context_noise=10 is not allowed"):
        Session(adapter, [], RolloutConfig(**config, sampler=attrs.evolve(recipe.sampler, context_noise=10))).run()
    with pytest.raises(RolloutConfigError, match="feeds the model timesteps \\[999, 969, 923, 842, 667\\]"):
        Session(adapter, [], RolloutConfig(**config, sampler=Sampler())).run()
    with pytest.raises(RolloutConfigError, match="prompt switches are not supported"):
        Session(adapter, [], RolloutConfig(**config, prompt_switches=[PromptSwitch(1, "b")])).run()
    with pytest.raises(RolloutConfigError, match="rollout_frames \\(got 25\\) to be a multiple of the model's 3"):
        Session(adapter, [], RolloutConfig(num_chunks=2, prompts=("a",), seeds=(0,),
                                                  recipe=get_recipe("skyreels"))).run()
    with pytest.raises(ParameterError, match="steps with UniPC in its own loop.*--recipe skyreels"):
        parse_sampler("skyreels,guidance=3")
    with pytest.raises(ParameterError, match="Stagger.ar_step must be an integer >= 0, got -1"):
        Stagger(ar_step=-1)
    with pytest.raises(ParameterError, match="Stagger.shift must be a finite number > 0, got 0.0"):
        Stagger(shift=0)
    with pytest.raises(ParameterError, match="a stagger cannot be combined with a rolling window"):
        attrs.evolve(get_recipe("rolling-forcing"), stagger=Stagger())


# ------------------------------------------------------------------------------------------------ hooks
@attrs.frozen
class HookOrder(Policy):
    """Logs the rollout hooks; asks once to prune nothing and re-run at chunk ``prune_at``'s step ``at_step``."""

    name: ClassVar[str] = "hook-order"
    prune_at: int = -1
    at_step: int = 0

    def new_state(self):
        return {"log": [], "asked": False}

    @hookimpl
    def cachepolicy_chunk_start(self, session, chunk):
        self.state(session)["log"].append(("start", chunk))

    @hookimpl
    def cachepolicy_after_step(self, session, step):
        state = self.state(session)
        state["log"].append(("step", step.chunk, step.step, step.timestep, step.attempt))
        if step.chunk == self.prune_at and step.step == self.at_step and not state["asked"]:
            state["asked"] = True
            return PruneRequest(drop=torch.zeros_like(step.view.valid),
                                samples=torch.ones(step.view.batch_size, dtype=torch.bool), reason="test")
        return None

    @hookimpl
    def cachepolicy_candidate_ready(self, session, candidate):
        self.state(session)["log"].append(("ready", candidate.chunk))

    @hookimpl
    def cachepolicy_chunk_end(self, session, chunk):
        self.state(session)["log"].append(("end", chunk))


def test_hooks_follow_the_first_block_of_each_call_and_a_restart_changes_nothing(reference):
    case = CASES["stagger"]
    expected, _ = reference["stagger"]
    recipe = recipe_for(**case)
    policy = HookOrder(prune_at=1, at_step=4)
    result, session = run_recipe(recipe, policies=[policy], **case)
    log = session.policy_state[policy.spec]["log"]
    events = [entry for entry in log if entry[0] != "step"]
    assert events == [e for c in range(5) for e in (("start", c), ("ready", c), ("end", c))]
    steps = [entry[1:] for entry in log if entry[0] == "step"]
    timesteps = Stagger(steps=5).timesteps()
    # block 0 leads every call until it is done; block b > 0 leads from the call after block b-1's last step,
    # at its step 5 - ar_step = 3
    assert [s[1] for s in steps if s[0] == 0] == [0, 1, 2, 3, 4]
    assert [s[1] for s in steps if s[0] == 1] == [3, 4, 4]  # step 4 twice: the re-run
    assert [s[1] for s in steps if s[0] == 4] == [3, 4]
    assert all(s[2] == timesteps[s[1]] for s in steps)
    assert result.trace[1]["retries"] == 1 and result.trace[2]["window_blocks"] == [2, 4]
    assert float((result.latents - expected).abs().max()) <= TOLERANCE  # the re-run changed nothing


def test_a_restart_after_a_shared_final_call_is_refused():
    """ar_step=0: all blocks finish in one call; once the first is committed that call cannot be re-run."""

    @attrs.frozen
    class PruneAtReady(Policy):
        name: ClassVar[str] = "prune-at-ready"

        @hookimpl
        def cachepolicy_candidate_ready(self, session, candidate):
            if candidate.chunk == 1:
                return PruneRequest(drop=torch.zeros_like(candidate.view.valid),
                                    samples=torch.ones(candidate.view.batch_size, dtype=torch.bool), reason="test")
            return None

    with pytest.raises(RolloutConfigError, match="re-run chunk 1, which finished in the same call as chunk 0"):
        run_recipe(recipe_for(**CASES["synchronous"]), 9, policies=[PruneAtReady()])



def test_tokentrim_composes_with_final_summaries_and_refuses_first_step(registry):
    """A block after the first leads its calls only from step steps - ar_step on: TokenTrim's first-step
    summaries would score block 0 alone, silently; final summaries run (and may re-run a call)."""
    recipe = recipe_for(**CASES["stagger"])
    with pytest.raises(ParameterError, match="first step runs while the block before it is still being denoised "
                                             "\\(ar_step=2 < 5 steps\\).*from step 3 on; use summary_at=final"):
        run_recipe(recipe, policies=build_policies("tokentrim", registry.policies), **CASES["stagger"])
    policies = build_policies("tokentrim:summary_at=final,p=0.3,lambda=0,warmup=1", registry.policies)
    result, _ = run_recipe(recipe, policies=policies, **CASES["stagger"])
    assert sum(record["retries"] for record in result.trace) >= 1  # lambda=0: it prunes and re-runs
    assert bool(torch.isfinite(result.latents).all())
    # ar_step >= steps: every block leads from its step 0, so first-step summaries see every block
    sequential = recipe_for(**{**CASES["stagger"], "ar_step": 5})
    run_recipe(sequential, policies=build_policies("tokentrim", registry.policies), **CASES["stagger"])
