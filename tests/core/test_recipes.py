"""Recipe arithmetic by hand: CausVid's restart positions, LongLive's re-cache ranges, validation, merging."""

from __future__ import annotations

import attrs
import pytest
import torch

from cachepolicy.errors import ParameterError, RolloutConfigError, UnknownNameError
from cachepolicy.recipes import Recache, Recipe, Restart, Rolling, Stagger, get_recipe, merge_policy_specs

#: ModelInfo fields of a small model (no adapter needed)
MODEL_INFO = dict(name="m", adapter="a", frames_per_chunk=3, latent_channels=4, latent_height=2, latent_width=2,
                  token_rows=1, token_cols=1, num_layers=1, num_heads=1, head_dim=4, max_frames=21, device="cpu",
                  dtype="float32")


def test_causvid_restart_positions_by_hand():
    restart = Restart(rollout_frames=21, overlap_frames=3)
    # rollout 0: chunks 0..6 at positions 0..20; rollout 1: overlap frames 18..20 at 0..2, chunks 7..12;
    # rollout 2: overlap 36..38, chunks 13..18
    assert [restart.origin(c, 3) for c in (0, 6, 7, 12, 13, 18, 19)] == [0, 0, 18, 18, 36, 36, 54]
    assert [c for c in range(20) if restart.restarts_at(c, 3)] == [7, 13, 19]
    positions = [3 * c - restart.origin(c, 3) for c in range(20)]
    assert max(positions) + 2 == 20 and positions[7] == 3 and positions[12] == 18


def test_restart_needs_whole_chunks_and_a_one_chunk_overlap():
    with pytest.raises(ParameterError, match="overlap_frames=21 must be smaller"):
        Restart(rollout_frames=21, overlap_frames=21)
    with pytest.raises(RolloutConfigError, match="multiple of the model's 3 frames.*exactly one chunk"):
        Restart(rollout_frames=20, overlap_frames=3).check(3)
    with pytest.raises(RolloutConfigError, match="overlap_frames \\(got 6\\)"):
        Restart(rollout_frames=21, overlap_frames=6).check(3)


def test_longlive_recache_ranges_by_hand():
    recache = Recache(window_frames=12, sink_frames=3)
    assert recache.frames(6) == (0, 6)  # s <= 12: everything, the sink too
    assert recache.frames(12) == (0, 12)
    assert recache.frames(15) == (6, 9)  # the 9 frames before s; the sink keeps its old K/V
    assert recache.frames(42) == (33, 9)  # LongLive's switch at frame 40 lands on chunk 14 (frame 42)
    with pytest.raises(ParameterError, match="sink_frames must be an integer in \\[0, window_frames=12\\), got 12"):
        Recache(window_frames=12, sink_frames=12)


def test_recipe_names_and_policy_merging():
    with pytest.raises(UnknownNameError, match="unknown recipe 'longlife'.*Did you mean 'longlive'"):
        get_recipe("longlife")
    longlive = get_recipe("longlive")
    assert merge_policy_specs(longlive, ["tokentrim"]) == [
        "attention-sink:frames=3", "sliding-window:frames=6", "tokentrim"]
    assert merge_policy_specs(longlive, ["sliding-window:frames=9+tokentrim"]) == [
        "attention-sink:frames=3", "sliding-window:frames=9+tokentrim"]
    assert merge_policy_specs(None, ["full"]) == ["full"]
    with pytest.raises(ParameterError, match="cannot both re-cache and restart"):
        Recipe(name="x", summary="", recache=Recache(), restart=Restart())
    assert get_recipe("causvid").max_rope_frames(300) == 21 and get_recipe("longlive").max_rope_frames(300) == 300


def test_rolling_forcing_working_cache_by_hand():
    rolling = Rolling(anchor_frames=3, max_attention_frames=21)
    # n_work = min(f - 1, (21 - 3 * blocks - 3) // 3): a full window of 5 blocks leaves room for 1 block
    assert rolling.working_blocks(8, 5, 3) == 1
    assert rolling.working_blocks(8, 3, 3) == 3 and rolling.working_blocks(8, 1, 3) == 5
    assert rolling.working_blocks(1, 5, 3) == 0 and rolling.working_blocks(2, 2, 3) == 1
    # anchor positions 3f - 3 n_work - 3 of the window starting at block 9 (5 blocks): 21..23
    assert 3 * 9 - 3 * rolling.working_blocks(9, 5, 3) - 3 == 21
    rolling.check(3, 5)
    with pytest.raises(RolloutConfigError, match="anchor_frames=6 must be one chunk"):
        Rolling(anchor_frames=6).check(3, 5)
    with pytest.raises(RolloutConfigError, match="cannot hold the anchor and a window of 6 blocks"):
        Rolling(max_attention_frames=18).check(3, 6)


def test_rolling_forcing_recipe_fields():
    recipe = get_recipe("rolling-forcing")
    assert recipe.rope_mode == "raw" and recipe.rolling == Rolling(3, 21)
    assert recipe.to_json()["rolling"] == {"anchor_frames": 3, "max_attention_frames": 21}
    assert get_recipe("longlive").to_json()["rope_mode"] == "absolute"
    assert merge_policy_specs(recipe, ["tokentrim"]) == [
        "attention-sink:frames=3", "sliding-window:frames=18", "tokentrim"]
    with pytest.raises(ParameterError, match="needs rope_mode='raw'"):
        Recipe(name="x", summary="", rolling=Rolling())
    with pytest.raises(ParameterError, match="rope_mode must be 'absolute' or 'raw'"):
        Recipe(name="x", summary="", rope_mode="relative")


def test_parse_sampler_accepts_recipes_specs_mappings_and_samplers():
    from cachepolicy.models import ModelInfo, Sampler, parse_sampler

    assert parse_sampler("self-forcing") == get_recipe("self-forcing").sampler
    assert parse_sampler(" causvid , guidance=3 ") == attrs.evolve(get_recipe("causvid").sampler, guidance=3.0)
    assert parse_sampler("steps=1000/750/500/250,shift=5,warp=true,table=true") == get_recipe("longlive").sampler
    assert parse_sampler({"steps": [1000, 500], "warp": False}) == Sampler(denoising_steps=(1000, 500), warp=False)
    sampler = Sampler(guidance=2.0)
    assert parse_sampler(sampler) is sampler
    with pytest.raises(ParameterError, match=r"unknown field\(s\) \['step'\]; allowed: context_noise, denoising_steps"):
        parse_sampler({"step": [1000]})
    with pytest.raises(ParameterError, match="sampler warp='maybe' is not allowed; write true or false"):
        parse_sampler("warp=maybe")
    with pytest.raises(ParameterError, match="sampler steps='1000/x': write /-separated timesteps"):
        parse_sampler("steps=1000/x")
    with pytest.raises(ParameterError, match="sampler noise='stale' is not allowed; choose fresh or predicted"):
        parse_sampler("causvid,noise=stale")
    # the model's sampler goes through the same conversion: no AttributeError deep in the engine
    info = MODEL_INFO
    assert ModelInfo(**info, sampler="rolling-forcing").sampler == get_recipe("rolling-forcing").sampler
    assert ModelInfo(**info, sampler=None).sampler == Sampler()
    with pytest.raises(ParameterError, match=r"sampler=\['causvid'\] is not allowed; give a recipe name"):
        ModelInfo(**info, sampler=["causvid"])


def test_stagger_schedule_by_hand():
    # counters: 0 not started, i = step i-1 in this call, steps+1 finished; block b is ar_step behind b-1
    assert Stagger(steps=3, ar_step=1).counters(3) == [(1, 0, 0), (2, 1, 0), (3, 2, 1), (4, 3, 2), (4, 4, 3)]
    assert Stagger(steps=3, ar_step=0).counters(3) == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    # ar_step >= steps: a block starts in the call after the one before has had its last step
    assert Stagger(steps=2, ar_step=5).counters(2) == [(1, 0), (2, 0), (3, 1), (3, 2)]
    # a finished overlap block first: the others run as from the start
    assert Stagger(steps=3, ar_step=1).counters(3, ready_blocks=1) == [(4, 1, 0), (4, 2, 1), (4, 3, 2), (4, 4, 3)]
    assert Stagger(steps=3, ar_step=1).window_blocks(3) == 3 and Stagger(steps=3, ar_step=5).window_blocks(9) == 1
    assert Stagger(steps=30, ar_step=5).window_blocks(5) == 5 and Stagger(steps=30, ar_step=0).window_blocks(5) == 5
    assert Stagger(steps=30, ar_step=10).window_blocks(5) == 3


def test_stagger_iterations_and_noise_geometry_by_hand():
    from cachepolicy.noise import NoiseSpec, OfficialNoise
    from cachepolicy.stagger import iterations

    # 4 chunks of 3 frames, iterations of 6 frames restarting from 3: chunks 0, 1 | overlap 1, chunk 2 | 2, 3
    assert iterations(4, 3, 6, 3) == [(0, 0, 2), (1, 1, 2), (2, 1, 2)]
    source = OfficialNoise("skyreels", 5, rollout_frames=6, overlap_frames=3)
    stream = source.stream(NoiseSpec((0, 1), (2, 3, 1, 1), "cpu", torch.float32, num_chunks=4, num_steps=2))
    drawn = [stream.draw(chunk, 0) for chunk in range(4)]
    generator = torch.Generator().manual_seed(5)
    first, second, third = (torch.randn(2, 2, 6, 1, 1, generator=generator) for _ in range(3))  # [B, C, T, H, W]
    assert torch.equal(drawn[0], first[:, :, :3]) and torch.equal(drawn[1], first[:, :, 3:])
    assert torch.equal(drawn[2], second[:, :, 3:]) and torch.equal(drawn[3], third[:, :, 3:])
    # one iteration (no restart): the whole video in one draw
    stream = OfficialNoise("skyreels", 5, rollout_frames=None).stream(
        NoiseSpec((0,), (2, 3, 1, 1), "cpu", torch.float32, num_chunks=3, num_steps=2))
    whole = torch.randn(1, 2, 9, 1, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(stream.draw(2, 0), whole[:, :, 6:])
    with pytest.raises(ParameterError, match="draws only initial noise"):
        stream.draw(0, 1)


def test_stagger_fields_and_checks():
    from cachepolicy.models import ModelInfo, Sampler

    with pytest.raises(ParameterError, match="Stagger.steps must be a positive integer, got 0"):
        Stagger(steps=0)
    with pytest.raises(ParameterError, match="Stagger.ar_step must be an integer >= 0, got 1.5"):
        Stagger(ar_step=1.5)
    with pytest.raises(ParameterError, match="Stagger.shift must be a number, got 'eight'"):
        Stagger(shift="eight")
    with pytest.raises(ParameterError, match="a stagger cannot be combined with a rolling window or a re-cache"):
        Recipe(name="x", summary="", stagger=Stagger(), recache=Recache())
    stagger = Stagger(steps=4, ar_step=1)
    assert stagger.timesteps() == [999, 960, 889, 728] and stagger.sigmas()[-1] == 0.0
    assert stagger.sampler(6.0).timesteps() == [999.0, 960.0, 889.0, 728.0]
    info = MODEL_INFO
    stagger.check(ModelInfo(**info, causal_block_frames=3), stagger.sampler(6.0), ())
    with pytest.raises(RolloutConfigError, match="in causal blocks of 1 frames; load it with causal_block_size=3"):
        stagger.check(ModelInfo(**info, causal_block_frames=1), stagger.sampler(6.0), ())
    with pytest.raises(RolloutConfigError, match="the sampler feeds \\[1000, 937.5, 833.333, 625\\]"):
        stagger.check(ModelInfo(**info, causal_block_frames=3), Sampler(), ())
    recipe = Recipe(name="x", summary="", stagger=stagger, noise_order="skyreels")
    assert recipe.official_noise(3).rollout_frames is None
    assert recipe.to_json()["stagger"]["timesteps"] == [999, 960, 889, 728]
