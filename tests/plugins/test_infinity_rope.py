"""``infinity-rope`` held against the reference code (``tests/fixtures/golden/infinity_rope``, ``tools/golden/README.md``
section 4): 15 chunks of a tiny random Wan model, window 6 frames with a 1-frame sink, five scenes
``scene0 | scene1 | scene2# | scene3# | scene4`` (prompt switches before chunks 3, 6, 9, 12; the last two are
scene cuts). Through the engine the latents must match to 2e-5 in every chunk, every call's key and query
positions must be the reference's, and deliberately wrong settings must fail.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.engine import PromptSwitch, RolloutConfig, Session
from cachepolicy.errors import CompositionError, ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerRequest
from cachepolicy.plugins.infinity_rope import InfinityRope, frame_ranks
from cachepolicy.policy import Policy
from cachepolicy.recipes import get_recipe
from tests.plugins import golden

#: the reference prompt's switches: '#' on a scene marks the switch after it as a cut
SWITCHES = (PromptSwitch(3, "scene1"), PromptSwitch(6, "scene2"), PromptSwitch(9, "#scene3"),
            PromptSwitch(12, "#scene4"))
CALLS = ("D1", "D2", "D3", "D4", "CTX")


@attrs.frozen
class PositionRecorder(Policy):
    """In layer 0 of every forward: the frames attended (resident, then the call's own) and the temporal RoPE
    positions of keys and queries. Changes nothing."""

    name: ClassVar[str] = "position-recorder"

    def new_state(self):
        return []

    @hookimpl
    def cachepolicy_layer_request(self, session, call):
        return LayerRequest(layers=[0])

    @hookimpl
    def cachepolicy_layer(self, session, layer):
        call, view = layer.call, layer.view
        valid = view.valid[0]
        frames = sorted(set(view.frame[0][valid].tolist()))
        positions = call.rope_positions[0][valid].tolist() if call.rope_positions is not None \
            else view.rope_pos[0][valid].tolist()
        resident = [positions[view.frame[0][valid].tolist().index(f)] for f in frames]
        own = list(range(call.rope_start, call.rope_start + call.num_frames))
        self.state(session).append({
            "chunk": call.chunk,
            "cache_frames": frames + list(range(call.frame_start, call.frame_start + call.num_frames)),
            "key_positions": resident + own, "query_positions": own})


@attrs.frozen
class AbsolutePositions(InfinityRope):
    """The same window, sink and flush, with every key at its absolute frame (no re-indexing)."""

    name: ClassVar[str] = "absolute-positions"

    @hookimpl
    def cachepolicy_rope_positions(self, session, call):
        return None


@pytest.fixture(scope="module")
def fixture():
    return golden.load("infinity_rope")


@pytest.fixture(scope="module")
def reproduced(fixture):
    result, session = golden.rollout(fixture, [InfinityRope()], switches=SWITCHES, observers=[PositionRecorder()])
    return result, session.policy_state[PositionRecorder().spec]


def test_infinity_rope_reproduces_the_reference_latents(fixture, reproduced):
    result, _ = reproduced
    errors = golden.chunk_errors(result, fixture)
    assert len(errors) == 15
    assert max(errors) <= golden.TOLERANCE, [f"{e:.2e}" for e in errors]


def test_infinity_rope_places_every_call_like_the_reference(fixture, reproduced):
    result, calls = reproduced
    reference = [c for c in fixture.decisions["calls"] if c["layer"] == 0]
    assert len(calls) == len(reference) == 75
    for ours, theirs in zip(calls, reference):
        for key in ("cache_frames", "key_positions", "query_positions"):
            assert ours[key] == theirs[key], (theirs["label"], key)
    flushes = fixture.decisions["flushes"]
    assert [r["chunk"] for r in result.trace if r["kv_flush"]] == [f["before_chunk"] for f in flushes]
    assert [r["chunk"] for r in result.trace if r["rope_cut"]] == [f["before_chunk"] for f in flushes
                                                                    if f["scene_cut"]] == [9, 12]
    assert fixture.meta["policy"]["rope_cut_positions"] == [45, 46, 47]


@pytest.mark.parametrize("policies, switches, first_bad_chunk", [
    ([InfinityRope()], tuple(PromptSwitch(s.chunk, s.prompts[0]) for s in SWITCHES), 9),  # cuts not marked
    ([InfinityRope(cut_position=44)], SWITCHES, 9),                                     # the cut elsewhere
    ([InfinityRope(flush_keep=1)], SWITCHES, 3),                                        # the flush keeps less
    ([InfinityRope(window=9)], SWITCHES, 2),                                            # a longer window
    ([AbsolutePositions()], SWITCHES, 2),                                               # absolute positions
])
def test_a_wrong_setting_fails_the_comparison(fixture, policies, switches, first_bad_chunk):
    result, _ = golden.rollout(fixture, policies, chunks=first_bad_chunk + 1, switches=switches)
    errors = golden.chunk_errors(result, fixture)
    assert max(errors[:first_bad_chunk]) <= golden.TOLERANCE
    assert errors[first_bad_chunk] > 1e-3, errors[first_bad_chunk]


def test_frame_ranks_pin_the_sink_and_close_gaps():
    frames = torch.tensor([[0, 0, 7, 7, 8, 9, 0], [0, 3, 3, 5, 5, 5, 5]])
    valid = torch.tensor([[True] * 6 + [False], [True] * 7])
    ranks, counts = frame_ranks(frames, valid)
    assert ranks.tolist() == [[0, 0, 1, 1, 2, 3, 0], [0, 1, 1, 2, 2, 2, 2]]
    assert counts == [4, 3]


def test_the_flush_keeps_the_sink_and_the_last_frames_and_resets_cross_attention():
    """With a window longer than the flush keeps, the flush drops frames and bumps the cache epoch (the
    cross-attention keys/values of the new prompt are computed)."""
    adapter = load_tiny_wan(seed=1)
    session = Session(adapter, [InfinityRope(window=12, sink=2, flush_keep=1)],
                      RolloutConfig(num_chunks=4, prompts=["a cat"], seeds=[0],
                                    prompt_switches=[PromptSwitch(3, "#a dog")], trace_residency=True))
    epochs = []
    original = session.cache.flush
    session.cache.flush = lambda keep: (epochs.append(session.cache.epoch), original(keep))[1]
    result = session.run()
    assert epochs == [0] and session.cache.epoch == 1
    # before chunk 3: frames 0..8 resident (window 12 = 9 + own 3); the flush keeps 0, 1 and 8
    assert sorted(map(int, result.trace[3]["residency"][0]["frames"])) == [0, 1, 8, 9, 10, 11]
    assert result.trace[3]["rope_cut"] and result.trace[3]["own_rope_start"] == 45
    assert [r["own_rope_start"] for r in result.trace[:3]] == [0, 3, 6]


def test_bad_settings_and_compositions_are_refused():
    adapter = load_tiny_wan(seed=0)
    config = RolloutConfig(num_chunks=2, prompts=["a"], seeds=[0])
    for policy, message in [(InfinityRope(window=3, sink=1), "window=3 does not hold sink=1"),
                            (InfinityRope(window=9, cut_position=5), "cut_position=5 is among"),
                            (InfinityRope(cut_position=1022), "past the model's RoPE table of 1024")]:
        with pytest.raises(ParameterError, match=message):
            Session(adapter, [policy], config).run()
    with pytest.raises(CompositionError, match="recipe 'longlive'"):
        Session(adapter, [InfinityRope()], RolloutConfig(num_chunks=2, prompts=["a"], seeds=[0],
                                                         recipe=get_recipe("longlive"))).run()
    with pytest.raises(ParameterError, match="window=0 is not allowed"):
        InfinityRope(window=0)
