"""Recipes against plain reimplementations of each system's inference loop.

The reference below is written from the systems' documented semantics (docs "Recipes", brief section 3),
not from this project's engine or cache: a fixed-size physical K/V buffer per layer with Self Forcing's /
LongLive's index arithmetic (``global_end_index``, ``local_end_index``, sink slots, roll on overflow,
LongLive's re-cache write that skips the sink slots), CausVid's unbounded buffer written at
``[current_start, current_end)`` and read up to ``current_end``, stock diffusers modules for everything
else, and one ``scaled_dot_product_attention`` over the keys the original would concatenate. The
timesteps and sigmas are the numbers recorded from the official code (``official_numbers.py``), not the
recipe's. Only the noise draws are shared with the engine (they are inputs, not semantics).
"""

from __future__ import annotations

import pytest
import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from tests.adapters.official_numbers import SIGMAS, SOURCES, TIMESTEPS
from tests.adapters.original import OriginalRun
from cachepolicy.api import build_policies
from cachepolicy.engine import PromptSwitch, RolloutConfig, Session
from cachepolicy.noise import noise_seed
from cachepolicy.errors import ParameterError, RolloutConfigError
from cachepolicy.models import Sampler, flow_match_table, table_sigma
from cachepolicy.recipes import get_recipe, merge_policy_specs

TOL = 1e-5


def chunk_noise(seeds, chunk, use, shape):
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(s, chunk, use))) for s in seeds]
    return torch.stack(draws)


class OfficialDraws:
    """The official scripts' draws (Self Forcing ``inference.py`` / ``pipeline/causal_inference.py``, CausVid's
    ``longvideo_autoregressive_inference.py``): one generator; ``randn([B, T, C, H, W])`` for a rollout's
    ``T`` frames before anything else, then after each denoising step but the last
    ``randn_like(x0.flatten(0, 1))`` (``[B * F, C, H, W]``, sample-major)."""

    def __init__(self, seed, batch, shape):
        self.generator = torch.Generator().manual_seed(seed)
        self.batch, self.shape = batch, shape

    def rollout(self, frames):
        channels, _, height, width = self.shape
        self.initial = torch.randn([self.batch, frames, channels, height, width], generator=self.generator)

    def initial_frames(self, start):
        return self.initial[:, start:start + self.shape[1]].permute(0, 2, 1, 3, 4)

    def step(self):
        channels, frames, height, width = self.shape
        noise = torch.randn([self.batch * frames, channels, height, width], generator=self.generator)
        return noise.view(self.batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)


def denoise_chunk(run, chunk, frame_start, cond, seeds, timesteps, sigmas, shape, rope_frame=None, official=None,
                  initial_frame=None):
    """Self Forcing's per-block loop: denoise, x0 in float64, fresh re-noising, then the clean context pass.
    Noise: the engine's seeded draws, or ``official`` (:class:`OfficialDraws`, block at ``initial_frame``)."""
    x = chunk_noise(seeds, chunk, 0, shape) if official is None else official.initial_frames(initial_frame)
    for i, (t, sigma) in enumerate(zip(timesteps, sigmas)):
        v = run.forward(x, t, frame_start, cond, rope_frame)
        x0 = (x.double() - sigma * v.double()).float()
        if i + 1 < len(sigmas):
            nxt = sigmas[i + 1]
            eps = chunk_noise(seeds, chunk, i + 1, shape) if official is None else official.step()
            x = (1 - nxt) * x0 + nxt * eps
    run.forward(x0, 0.0, frame_start, cond, rope_frame)
    return x0


def make_adapter():
    return load_tiny_wan(seed=3)


def engine_latents(adapter, recipe, num_chunks, prompts, seeds, user_policies=(), switches=(), noise=None):
    specs = merge_policy_specs(recipe, list(user_policies))
    policies = build_policies(*specs) if specs else []
    config = RolloutConfig(num_chunks=num_chunks, prompts=prompts, seeds=seeds, recipe=recipe,
                           prompt_switches=switches, noise=noise)
    session = Session(adapter, policies, config)
    return session.run(), session


def _setup(num_chunks, system, **cache):
    adapter = make_adapter()
    reference = make_adapter().detach()
    info = adapter.info
    shape = (info.latent_channels, info.frames_per_chunk, info.latent_height, info.latent_width)
    run = OriginalRun(reference, system, 2, tokens_per_frame=info.tokens_per_frame,
                      total_frames=num_chunks * info.frames_per_chunk, **cache)
    return adapter, run, shape


PROMPTS = ("a red fox runs", "a blue bird flies")
SEEDS = (11, 12)


@pytest.mark.parametrize("official", [False, True])
def test_self_forcing_recipe_equals_the_original_loop_global_and_windowed(official):
    """With the engine's seeded noise, and with the official script's draws from one seeded generator
    (``recipe.official_noise()``: one ``[B, T, C, H, W]`` draw, then ``[B * F, C, H, W]`` per step)."""
    recipe = get_recipe("self-forcing")
    for window, sink, policies in ((-1, 0, ()), (9, 3, ("attention-sink:frames=3+sliding-window:frames=3",))):
        num_chunks = 6
        adapter, run, shape = _setup(num_chunks, "self-forcing", window_frames=window, sink_frames=sink)
        cond = adapter.encode_prompts(list(PROMPTS))
        frames = adapter.info.frames_per_chunk
        draws = None
        if official:
            draws = OfficialDraws(SEEDS[0], len(SEEDS), shape)
            draws.rollout(num_chunks * frames)
        expected = [denoise_chunk(run, c, c * frames, cond, SEEDS, TIMESTEPS["self-forcing"],
                                  SIGMAS["self-forcing"], shape, official=draws, initial_frame=c * frames)
                    for c in range(num_chunks)]
        noise = recipe.official_noise() if official else None
        result, _ = engine_latents(adapter, recipe, num_chunks, PROMPTS, SEEDS, policies, noise=noise)
        diff = (result.latents - torch.cat(expected, dim=2)).abs().max().item()
        assert diff <= TOL, (window, sink, diff)
    if official:  # the stream is not the seeded one, and a batch draws together
        seeded, _ = engine_latents(make_adapter(), recipe, 2, PROMPTS, SEEDS)
        alone, _ = engine_latents(make_adapter(), recipe, 2, PROMPTS[1:], SEEDS[1:], noise=recipe.official_noise())
        joint, _ = engine_latents(make_adapter(), recipe, 2, PROMPTS, SEEDS, noise=recipe.official_noise())
        assert (seeded.latents - joint.latents).abs().max().item() > 1e-2
        assert (alone.latents[0] - joint.latents[1]).abs().max().item() > 1e-2


def test_the_original_loop_with_self_forcings_cross_attention_cache_is_the_same_loop():
    """The reference side of benchmarks/vs_self_forcing.py: caching the prompt's keys/values as Self Forcing's
    ``crossattn_cache`` does changes nothing but the work."""
    outputs = []
    for cross_cache in (False, True):
        adapter, reference = make_adapter(), make_adapter().detach()
        info = adapter.info
        shape = (info.latent_channels, info.frames_per_chunk, info.latent_height, info.latent_width)
        run = OriginalRun(reference, "self-forcing", 2, tokens_per_frame=info.tokens_per_frame, total_frames=9,
                          cross_cache=cross_cache)
        cond = adapter.encode_prompts(list(PROMPTS))
        outputs.append(torch.cat([denoise_chunk(run, c, 3 * c, cond, SEEDS, TIMESTEPS["self-forcing"],
                                                SIGMAS["self-forcing"], shape) for c in range(3)], dim=2))
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-6


def test_longlive_recipe_equals_the_original_loop_with_prompt_switches():
    """Switches at chunk 2 (frame 6 <= 12: every frame re-encoded, the sink too) and chunk 6 (frame 18:
    the 9 frames before it re-encoded, the sink's old K/V kept), LongLive's ``global_sink=True``."""
    recipe = get_recipe("longlive")
    num_chunks = 9
    adapter, run, shape = _setup(num_chunks, "longlive", window_frames=12, sink_frames=3)
    frames = adapter.info.frames_per_chunk
    switches = {2: ("a green frog jumps", "a white cat sleeps"), 6: ("snow falls on a city",)}
    cond = adapter.encode_prompts(list(PROMPTS))
    output = []
    for c in range(num_chunks):
        start = c * frames
        if c in switches:  # _recache_after_switch: last min(A, s) frames, clean, new prompt, one pass
            prompts = list(switches[c]) * (2 if len(switches[c]) == 1 else 1)
            cond = adapter.encode_prompts(prompts)
            count = min(12, start)
            previous = torch.cat(output, dim=2)[:, :, start - count:start]
            run.forward(previous, 0.0, start - count, cond)
        output.append(denoise_chunk(run, c, start, cond, SEEDS, TIMESTEPS["longlive"], SIGMAS["longlive"], shape))
    result, session = engine_latents(adapter, recipe, num_chunks, PROMPTS, SEEDS,
                                     switches=[PromptSwitch(c, p) for c, p in switches.items()])
    diff = (result.latents - torch.cat(output, dim=2)).abs().max().item()
    assert diff <= TOL, diff
    recached = {r["chunk"]: r.get("recached_frames") for r in result.trace}
    assert recached[2] == [0, 6] and recached[6] == [9, 18] and recached[5] is None
    # the switch matters: without the re-cache the result differs
    plain, _ = engine_latents(make_adapter(), None, num_chunks, PROMPTS, SEEDS,
                              user_policies=("attention-sink:frames=3+sliding-window:frames=6",),
                              switches=[PromptSwitch(c, p) for c, p in switches.items()])
    assert (plain.latents[:, :, 6:] - result.latents[:, :, 6:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("official", [False, True])
def test_causvid_recipe_equals_the_original_long_video_loop(official):
    """Rollouts of 21 frames (7 chunks); each later rollout starts from the last 3 frames at position 0
    and adds 6 chunks: 14 chunks = rollout 0 (chunks 0-6), 1 (7-12), 2 (13). With the engine's seeded
    noise, and with the official draws (a ``[B, 21, C, H, W]`` draw per rollout, its first 3 frames unused
    after the first rollout; ``[B * 3, C, H, W]`` per step)."""
    recipe = get_recipe("causvid")
    num_chunks = 14
    adapter, run, shape = _setup(num_chunks, "causvid")
    frames = adapter.info.frames_per_chunk
    cond = adapter.encode_prompts(list(PROMPTS))
    draws = OfficialDraws(SEEDS[0], len(SEEDS), shape) if official else None
    output = []
    chunk = 0
    block = 0  # block index inside the current rollout
    while chunk < num_chunks:
        if chunk in (0, 7, 13) and draws is not None:
            draws.rollout(21)
        if chunk in (7, 13):  # new rollout: start latents = last 3 frames, block 0 at timestep 0
            start_latents = torch.cat(output, dim=2)[:, :, -3:]
            run.forward(start_latents, 0.0, 0, cond)
            block = 1
        output.append(denoise_chunk(run, chunk, block * frames, cond, SEEDS, TIMESTEPS["causvid"],
                                    SIGMAS["causvid"], shape, official=draws, initial_frame=block * frames))
        chunk += 1
        block += 1
    noise = recipe.official_noise() if official else None
    result, _ = engine_latents(adapter, recipe, num_chunks, PROMPTS, SEEDS, noise=noise)
    diff = (result.latents - torch.cat(output, dim=2)).abs().max().item()
    assert diff <= TOL, diff
    restarts = {r["chunk"]: r.get("restart_overlap_frames") for r in result.trace}
    assert restarts[7] == [18, 21] and restarts[13] == [36, 39] and restarts[8] is None


@pytest.mark.parametrize("name", ["self-forcing", "longlive", "rolling-forcing", "causvid"])
def test_recipe_feeds_the_official_float32_numbers_exactly(name):
    """Every timestep the model is called with and every sigma of ``x0 = x - sigma * v`` and of the
    re-noising equal, to the bit, what the official code computes (``official_numbers.py``)."""
    sampler = get_recipe(name).sampler
    assert get_recipe(name).source.split("@")[1][:7] == SOURCES[name].split("@")[1][:7]
    assert tuple(sampler.timesteps()) == TIMESTEPS[name]
    assert tuple(sampler.sigmas()) == SIGMAS[name]
    assert all(float(torch.tensor(t, dtype=torch.float32)) == t for t in sampler.timesteps())  # float32 values


def test_float64_warping_misses_the_official_numbers():
    """What the float32 table changes: a float64 warp cast to float32 is one float32 step off at three of
    Rolling Forcing's five model timesteps, and its float64 sigmas differ from the table's at every
    non-trivial step (Self Forcing's timesteps happen to round the same)."""
    rolling = Sampler(denoising_steps=(1000, 800, 600, 400, 200), shift=5.0, warp=True)
    cast = [float(torch.tensor(t, dtype=torch.float32)) for t in rolling.timesteps()]
    off = [i for i, (a, b) in enumerate(zip(cast, TIMESTEPS["rolling-forcing"])) if a != b]
    assert off == [1, 2, 4]
    for i in off:
        ulp = torch.finfo(torch.float32).eps * 2 ** 9  # one float32 step at [512, 1024)
        assert abs(cast[i] - TIMESTEPS["rolling-forcing"][i]) == ulp
    assert [i for i, (a, b) in enumerate(zip(rolling.sigmas(), SIGMAS["rolling-forcing"])) if a != b] == [1, 2, 3, 4]
    self_forcing = Sampler(denoising_steps=(1000, 750, 500, 250), shift=5.0, warp=True)
    assert [float(torch.tensor(t, dtype=torch.float32)) for t in self_forcing.timesteps()] == list(
        TIMESTEPS["self-forcing"])
    assert self_forcing.sigmas()[2] != SIGMAS["self-forcing"][2]  # 0.8333333333333334 vs 0.8333333134651184


def test_flow_match_table_by_hand():
    sigmas, timesteps = flow_match_table(5.0)
    assert len(sigmas) == len(timesteps) == 1000 and sigmas[0] == 1.0 and timesteps[0] == 1000.0
    # entry 1000 - 750 = 250: s = linspace value 0.75, 5 * 0.75 / (1 + 4 * 0.75) = 0.9375, exact in float32
    assert sigmas[250] == 0.9375 and timesteps[250] == 937.5
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))  # strictly decreasing: lookups are unique


def test_table_sampler_needs_integer_steps_and_booleans():
    with pytest.raises(ParameterError, match=r"integer steps.*got non-integer steps \[937.5\]"):
        Sampler(denoising_steps=(1000, 937.5), table=True)
    with pytest.raises(ParameterError, match="sampler warp must be true or false, got 'yes'"):
        Sampler(warp="yes")
    with pytest.raises(ParameterError, match="sampler table must be true or false, got 1"):
        Sampler(table=1)
    assert Sampler(denoising_steps=(1000, 937.5), warp=False).timesteps() == [1000.0, 937.5]


def test_causvid_sigmas_come_from_the_shift_8_table():
    # FlowMatchScheduler(shift=8, sigma_min=0, extra_one_step=True): nearest table entries, by hand
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = 8 * s / (1 + 7 * s)
    assert table_sigma(757, 8.0) == pytest.approx(float(table[torch.argmin((table * 1000 - 757).abs())]))
    assert table_sigma(757, 8.0) == pytest.approx(0.756757, abs=1e-6)
    assert table_sigma(522, 8.0) == pytest.approx(0.521739, abs=1e-6)
    assert table_sigma(1000, 8.0) == 1.0


def test_prompt_switch_at_a_chunk_that_does_not_exist_is_refused():
    with pytest.raises(RolloutConfigError, match="switch at chunk 5 does not exist.*chunks 0..4.*1..4"):
        RolloutConfig(num_chunks=5, prompts=["a"], seeds=[0], prompt_switches=[PromptSwitch(5, "b")])
    with pytest.raises(RolloutConfigError, match="chunk index >= 1"):
        PromptSwitch(0, "b")
    with pytest.raises(RolloutConfigError, match="strictly increasing"):
        RolloutConfig(num_chunks=5, prompts=["a"], seeds=[0],
                      prompt_switches=[PromptSwitch(3, "b"), PromptSwitch(2, "c")])
    with pytest.raises(RolloutConfigError, match="3 prompts for 2 samples"):
        RolloutConfig(num_chunks=5, prompts=["a", "b"], seeds=[0, 1],
                      prompt_switches=[PromptSwitch(3, ["x", "y", "z"])])


def test_a_leading_hash_marks_a_scene_cut_and_is_not_encoded():
    from cachepolicy.cli import _parse_switch

    switch = PromptSwitch(2, "#  a beach at night")
    assert switch.cut and switch.prompts == ("a beach at night",)
    assert not PromptSwitch(2, "a beach").cut and PromptSwitch(2, "a beach", cut=True).cut
    assert PromptSwitch(2, ["#x", "#y"]).prompts == ("x", "y")
    assert _parse_switch("3:#a dog").cut and _parse_switch("3:#a dog").prompts == ("a dog",)
    with pytest.raises(RolloutConfigError, match="in some prompts only"):
        PromptSwitch(2, ["#x", "y"])
    with pytest.raises(RolloutConfigError, match="no prompt after it"):
        PromptSwitch(2, "#")
    seen = []
    adapter = load_tiny_wan(seed=0)
    encoder = adapter.text_encoder
    adapter.text_encoder = lambda prompts: (seen.extend(prompts), encoder(prompts))[1]
    Session(adapter, [], RolloutConfig(num_chunks=3, prompts=["a"], seeds=[0],
                                       prompt_switches=[PromptSwitch(2, "#b c")])).check()
    assert seen == ["a", "b c"]
