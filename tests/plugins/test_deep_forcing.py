"""Deep Forcing (``deep-forcing``, ``participative-compression``, ``deep-sink``) held against the reference code.

The fixture (``tests/fixtures/golden/deep_forcing``, ``tools/golden/README.md`` section 1) is the reference's own
loop on a tiny random Wan model at the paper's settings (W=21, S=10, N=16, R=4, reuse limit 7): 22 chunks,
compressions and sink re-alignments at chunks 7, 9, ..., 21 (shifts 5, then 6), the reuse limit excluding
candidates at chunk 21. Through the engine, ``deep-forcing`` must give the reference's latents to 2e-5 in
every chunk and the same decisions: each layer's tokens and their RoPE frames after every chunk, the
candidates the reuse limit excluded, the sink shifts. Deliberately wrong settings must fail.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import CompositionError, ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.plugins.deep_forcing import DeepForcing
from cachepolicy.plugins.deep_sink import DeepSink, sink_start
from cachepolicy.plugins.infinity_rope import InfinityRope
from cachepolicy.plugins.participative_compression import ParticipativeCompression, participation_scores
from cachepolicy.plugins.sliding_window import SlidingWindow
from cachepolicy.policy import Policy
from tests.plugins import golden

COMPRESSION_CHUNKS = [7, 9, 11, 13, 15, 17, 19, 21]


@attrs.frozen
class LayoutRecorder(Policy):
    """After every chunk, per layer: the token ids (``frame * n + row * cols + col``) its cell holds, in slot
    order, and their RoPE frames. Changes nothing."""

    name: ClassVar[str] = "layout-recorder"

    def new_state(self):
        return {}

    @hookimpl
    def cachepolicy_chunk_end(self, session, chunk):
        view = session.cache.view()
        n = session.model.tokens_per_frame
        ids = view.frame * n + view.spatial_index
        layers = []
        for layer in range(session.model.num_layers):
            (cell,) = session.cache.layer_cells(layer)
            slots = cell.residency.slots[0, :cell.residency.lengths[0]]
            layers.append((ids[0, slots].tolist(), view.rope_pos[0, slots].tolist()))
        self.state(session)[chunk] = layers


def runs_of(values: list[int]) -> list[list[int]]:
    """``[value, count]`` runs (the fixture's ``abs_frame_runs`` layout)."""
    out: list[list[int]] = []
    for value in values:
        if out and out[-1][0] == value:
            out[-1][1] += 1
        else:
            out.append([value, 1])
    return out


@pytest.fixture(scope="module")
def fixture():
    return golden.load("deep_forcing")


@pytest.fixture(scope="module")
def reproduced(fixture):
    result, session = golden.rollout(fixture, [DeepForcing()], observers=[LayoutRecorder()])
    return result, session.policy_state[LayoutRecorder().spec]


def test_deep_forcing_reproduces_the_reference_latents(fixture, reproduced):
    result, _ = reproduced
    errors = golden.chunk_errors(result, fixture)
    assert len(errors) == 22
    assert max(errors) <= golden.TOLERANCE, [f"{e:.2e}" for e in errors]


def test_deep_forcing_makes_the_reference_decisions(fixture, reproduced):
    result, layouts = reproduced
    compressions = fixture.decisions["compressions"]
    assert sorted({c["chunk"] for c in compressions}) == COMPRESSION_CHUNKS
    assert [r["chunk"] for r in result.trace if r["compressed_layers"]] == COMPRESSION_CHUNKS
    assert all(r["compressed_layers"] in (0, 3) for r in result.trace)
    for record in compressions:  # tokens kept per layer, and the candidates the reuse limit excluded
        ids, _ = layouts[record["chunk"]][record["layer"]]
        assert ids == golden.token_ids(record["kept_token_ids"]), record["label"]
        trace = result.trace[record["chunk"]]
        assert trace["reuse_excluded"][record["layer"]] == record["candidates_excluded_by_reuse"], record["label"]
    assert sum(r["candidates_excluded_by_reuse"] for r in compressions) == 3  # layer 1: 2, layer 2: 1 (chunk 21)
    shifts = {r["chunk"]: r["delta"] for r in fixture.decisions["sink_rotations"]}
    assert {r["chunk"]: r["sink_shift"][0] for r in result.trace if r["sink_shift"][0]} == shifts
    assert list(shifts.values()) == [5, 6, 6, 6, 6, 6, 6, 6]
    for change in fixture.decisions["cache_layout_changes"]:  # every layer's tokens and RoPE frames, every chunk
        ids, positions = layouts[change["chunk"]][change["layer"]]
        assert ids == golden.token_ids(change["cache_token_ids"]), change["label"]
        assert runs_of(positions) == change["abs_frame_runs"], change["label"]


@pytest.mark.parametrize("wrong, first_bad_chunk", [
    (DeepForcing(recent=3), 7),                   # R: the query ring and the protected recent tokens
    (DeepForcing(reuse_limit=0), 21),             # no reuse limit: chunk 21 selects differently
    (DeepForcing(reuse_limit=8), 21),             # the limit off by one
    (DeepForcing(placement="contiguous"), 7),     # the sink F frames later (the paper's reading)
    (DeepForcing(window=22, budget=17), 7),       # the bootstrap shift W - N unchanged, the window not
    (DeepForcing(fusion="max"), 7),               # max instead of sum over the recent queries
    (ParticipativeCompression(), 7),              # no sink re-alignment at all
])
def test_a_wrong_setting_fails_the_comparison(fixture, wrong, first_bad_chunk):
    chunks = first_bad_chunk + 1
    result, _ = golden.rollout(fixture, [wrong], chunks=chunks)
    errors = golden.chunk_errors(result, fixture)
    assert max(errors[:first_bad_chunk]) <= golden.TOLERANCE  # identical until it matters
    assert errors[first_bad_chunk] > 1e-3, f"{wrong.spec}: {errors[first_bad_chunk]:.2e}"


def test_a_wrong_bootstrap_shift_fails_the_comparison(fixture, monkeypatch):
    """Δ: the first re-alignment by 0 (the path without compression) instead of W - N = 5."""
    from cachepolicy.plugins import deep_sink

    original = deep_sink.SinkAlignment.realign
    monkeypatch.setattr(deep_sink.SinkAlignment, "realign",
                        lambda self, session, frames, sigmas, first, placement:
                        original(self, session, frames, sigmas, 0, placement))
    result, _ = golden.rollout(fixture, [DeepForcing()], chunks=8)
    assert golden.chunk_errors(result, fixture)[7] > 1e-3


def test_participative_compression_alone_selects_like_the_reference_at_the_first_compression(fixture):
    """Without the sink re-alignment the first compression keeps the same tokens (the sink is never scored),
    but the latents differ from there on (above)."""
    result, session = golden.rollout(fixture, [ParticipativeCompression()], chunks=8, observers=[LayoutRecorder()])
    layouts = session.policy_state[LayoutRecorder().spec]
    for record in fixture.decisions["compressions"][:3]:
        assert record["chunk"] == 7
        assert layouts[7][record["layer"]][0] == golden.token_ids(record["kept_token_ids"])
    assert "sink_shift" not in result.trace[7]


def test_the_float32_sinusoid_costs_half_the_budget(fixture):
    """What the float64 sinusoid buys: diffusers' float32 sinusoid alone moves the latents by ~1e-5."""
    result, _ = golden.rollout(fixture, [DeepForcing()], chunks=8, float64_sinusoid=False)
    errors = golden.chunk_errors(result, fixture)
    assert 4e-6 < max(errors) <= golden.TOLERANCE


# ------------------------------------------------------------------------------------- arithmetic
def test_sink_start_is_the_code_arithmetic():
    n, F = 12, 3
    # first compression of the paper's settings: s=21, 16 frames kept (the chunk's own included) -> 5
    assert sink_start(21, 16 * n, 10 * n, n, F, "code") == 5
    assert sink_start(27, 16 * n, 10 * n, n, F, "code") == 11
    assert sink_start(27, 16 * n, 10 * n, n, F, "contiguous") == 14
    # a partial tail frame is floored, as the code's tail_len_frames
    assert sink_start(27, 16 * n - 5, 10 * n, n, F, "code") == 12


def test_participation_scores_by_hand():
    ring = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # [r=2, H=1, D=2]
    keys = torch.tensor([[[1.0, 1.0]], [[3.0, 0.0]], [[0.0, -1.0]]])  # [T=3, H=1, D=2]
    scale = 1 / (2 ** 0.5)
    assert torch.allclose(participation_scores(ring, keys, "sum"), torch.tensor([3.0, 3.0, -2.0]) * scale)
    assert torch.allclose(participation_scores(ring, keys, "max"), torch.tensor([2.0, 3.0, 0.0]) * scale)


# -------------------------------------------------------------------------------------- deep-sink alone
def test_deep_sink_with_a_window_is_the_ds_only_ablation():
    """SF+DS: ``deep-sink:frames=S+sliding-window:frames=W-S-F``. Nothing moves until the window first
    evicts (sigma = s - W = 0 there, the code's first shift 0), then the sink moves one chunk per chunk and its
    keys are RoPE at the new frames (rope_pos); the window still attends to W frames."""
    adapter = load_tiny_wan(seed=0)
    session = Session(adapter, [DeepSink(frames=2), SlidingWindow(frames=4)],
                      RolloutConfig(num_chunks=7, prompts=["a"], seeds=[0]))
    result = session.run()
    # W = 2 + 4 + 3 = 9 frames. The window first evicts after chunk 2 (frames 2..4 of 0..8), so chunk 3
    # (s = 9) is the reference's first overflow: sigma = 9 - 9 = 0, first shift 0; then 3 per chunk
    assert [r["sink_shift"][0] for r in result.trace] == [0, 0, 0, 0, 3, 3, 3]
    assert [r["sink_start"][0] for r in result.trace] == [0, 0, 0, 0, 3, 6, 9]
    view = session.cache.view()
    sink = view.frame < 2
    assert torch.equal(view.rope_pos[sink], view.frame[sink] + 9)
    assert torch.equal(view.rope_pos[~sink], view.frame[~sink])


def test_deep_sink_refuses_compositions_it_cannot_place():
    adapter = load_tiny_wan(seed=0)
    config = RolloutConfig(num_chunks=2, prompts=["a"], seeds=[0])
    with pytest.raises(CompositionError, match="deep-forcing is both"):
        Session(adapter, [DeepSink(), ParticipativeCompression()], config).run()
    with pytest.raises(CompositionError, match="rope_mode='raw'"):
        Session(adapter, [DeepSink(), InfinityRope()], config).run()


@pytest.mark.parametrize("make, message", [
    (lambda: ParticipativeCompression(sink=10, recent=8, budget=16), "exceed budget=16"),
    (lambda: DeepForcing(budget=22), "larger than window=21"),
    (lambda: DeepForcing(fusion="mean"), "fusion='mean' is not allowed; choose one of sum, max"),
    (lambda: DeepSink(placement="paper"), "placement='paper' is not allowed"),
    (lambda: DeepForcing(recent=0), "recent=0 is not allowed"),
])
def test_bad_settings_are_refused_with_the_value(make, message):
    with pytest.raises(ParameterError, match=message):
        make()


def test_recent_shorter_than_a_chunk_is_refused_before_the_run():
    with pytest.raises(ParameterError, match="recent=2 is shorter than a chunk"):
        Session(load_tiny_wan(seed=0), [DeepForcing(sink=1, budget=4, recent=2, window=8)],
                RolloutConfig(num_chunks=2, prompts=["a"], seeds=[0])).run()


def test_layers_compressed_on_their_own_stay_within_the_bound():
    """Each layer compresses to its own keep set (its own buffer, sized for the kept tokens plus one chunk);
    when it must grow for the next chunk it grows to the policy's bound (window + one chunk), not x1.5 past
    it, so the peak cache is the bound's."""
    adapter = load_tiny_wan(seed=0, num_layers=4)
    capacities = []
    session = Session(adapter, [DeepForcing(window=12, sink=5, budget=9, recent=3)],
                      RolloutConfig(num_chunks=9, prompts=["a"], seeds=[0]),
                      on_chunk=lambda record: capacities.append(max(c.k.shape[1] for c in session.cache.cells)))
    result = session.run()
    bound = (12 + 3) * adapter.info.tokens_per_frame
    assert session.cache.split  # the layers did compress on their own
    assert max(capacities) == bound
    assert max(record["cache_bytes"] for record in result.trace) == pytest.approx(
        bound * adapter.info.num_layers * adapter.info.num_heads * session.cache.head_dim * 4 * 2, rel=0)
