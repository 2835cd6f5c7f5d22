"""Caches whose layers and heads hold different tokens, and the cache edits, against explicit oracles.

* selections per layer and per (layer, head), and drops made inside a layer before it attends: every model
  forward equals one stock full forward under the block-causal mask that gives each layer and head exactly
  the tokens it held (``tests/oracle.py``), for random keep patterns, shapes and batches (hypothesis);
* a merge equals explicit attention over the merged keys and values;
* a re-rotation by a frame delta equals RoPE applied at the new positions;
* a flush (at a prompt switch) equals the oracle that sees exactly the kept tokens, under the new prompt.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cachepolicy.adapters.wan import adapter as wan_adapter
from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerEdit, LayerRequest, Merge
from cachepolicy.policy import Policy, Selection
from tests.oracle import Recorder, adapter_forward, check_rollout_against_full_forward, layer_keys

TOLERANCE = 1e-5
MODEL = dict(num_attention_heads=4, attention_head_dim=6, num_layers=3)


@attrs.frozen
class RandomKeep(Policy):
    """Drops random unprotected tokens per token, per layer, per (layer, head), or per (layer, head group: heads
    ``h`` and ``h + 2`` draw alike) at every selection; the chunk just committed stays. A fresh generator seeded by
    (seed, chunk): a pure function of session and view."""

    name: ClassVar[str] = "random-keep"
    granularity: str = "head"
    fraction: float = 0.4
    seed: int = 0

    @hookimpl
    def cachepolicy_select(self, session, view):
        info = session.model
        shape = {"token": (), "layer": (info.num_layers,), "head": (info.num_layers, info.num_heads),
                 "group": (info.num_layers, 2)}
        generator = torch.Generator().manual_seed(self.seed * 1000 + session.chunk)
        draw = torch.rand(*shape[self.granularity], *view.valid.shape, generator=generator) < self.fraction
        if self.granularity == "group":
            draw = draw[:, [h % 2 for h in range(info.num_heads)]]
        return Selection(drop=draw & view.valid & (view.chunk < session.chunk))


@attrs.frozen
class LogitDrop(Policy):
    """Inside layer ``layer``, at the first call of every chunk from chunk 2 on, each head drops its
    ``count`` lowest-logit resident tokens (raw logits of this call's queries)."""

    name: ClassVar[str] = "logit-drop"
    layer: int = 1
    count: int = 5

    @hookimpl
    def cachepolicy_layer_request(self, session, call):
        return LayerRequest(layers=[self.layer]) if call.first and call.chunk >= 2 else None

    @hookimpl
    def cachepolicy_layer(self, session, layer):
        scores = layer.logits()  # [B, H, S], -inf where not held
        held = torch.isfinite(scores)
        order = scores.masked_fill(~held, float("inf")).argsort(dim=-1)[..., :self.count]
        drop = torch.zeros_like(held).scatter_(-1, order, True) & held
        return LayerEdit(drop=drop.permute(1, 0, 2))  # [H, B, S]


def recorded(adapter, policies, chunks, seeds, **config):
    recorder = Recorder()
    prompts = config.pop("prompts", [f"prompt number {s}" for s in seeds])
    session = Session(adapter, [*policies, recorder], RolloutConfig(num_chunks=chunks, prompts=prompts,
                                                                     seeds=list(seeds), **config))
    result = session.run()
    return result, session.policy_state[recorder.spec], session


@settings(max_examples=10, deadline=None)
@given(granularity=st.sampled_from(["layer", "head", "group"]), batch=st.integers(1, 2), chunks=st.integers(3, 4),
       seed=st.integers(0, 50), fraction=st.sampled_from([0.3, 0.7]))
def test_per_layer_and_per_head_caches_equal_the_full_forward(granularity, batch, chunks, seed, fraction):
    adapter = load_tiny_wan(seed=seed % 5, **MODEL)
    policy = RandomKeep(granularity=granularity, fraction=fraction, seed=seed)
    result, records, session = recorded(adapter, [policy], chunks, range(batch))
    assert session.cache.split  # layers (and heads) really hold different tokens
    if granularity != "layer":
        assert any(len(session.cache.layer_cells(layer)) > 1 for layer in range(MODEL["num_layers"]))
    if granularity == "group":
        assert all(len(cell.heads) == 2 for cell in session.cache.cells)
    assert check_rollout_against_full_forward(adapter, result, records) <= TOLERANCE


def test_the_oracle_tells_heads_apart():
    """Negative control: give every head the tokens of head 0 in the oracle and it fails."""
    adapter = load_tiny_wan(seed=1, **MODEL)
    result, records, _ = recorded(adapter, [RandomKeep(granularity="head", fraction=0.5)], 4, [0])
    assert check_rollout_against_full_forward(adapter, result, records) <= TOLERANCE
    for fwd in records["forwards"]:
        fwd["resident"] = [[layer[0]] * len(layer) for layer in fwd["resident"]]
    for chunk, commit in records["commits"].items():
        records["commits"][chunk] = [[layer[0]] * len(layer) for layer in commit]
    assert check_rollout_against_full_forward(adapter, result, records) > 1e-3


def test_ragged_heads_attend_only_to_what_they_hold(monkeypatch):
    """After a per-head split, one attention call per head group, each over its own resident length."""
    adapter = load_tiny_wan(seed=2, **MODEL)
    shapes = []
    original = wan_adapter.CachedWanAttnProcessor.attention

    def spy(self, query, key, value, mask):
        shapes.append((query.shape[2], key.shape[1]))
        return original(self, query, key, value, mask)

    monkeypatch.setattr(wan_adapter.CachedWanAttnProcessor, "attention", spy)
    _, records, session = recorded(adapter, [RandomKeep(granularity="head", fraction=0.6, seed=3)], 4, [0])
    # the last context pass: per layer, heads that held the same tokens share one call over them + the chunk's
    expected = []
    for layer in records["commits"][3]:
        groups: dict[tuple[int, ...], int] = {}
        for head in layer:
            key = tuple(head[0].tolist())
            groups[key] = groups.get(key, 0) + 1
        expected += [(count, len(ids) + 3 * adapter.info.tokens_per_frame) for ids, count in groups.items()]
    assert len(expected) > MODEL["num_layers"] and len({length for _, length in expected}) > 1
    assert sorted(shapes[-len(expected):]) == sorted(expected)


@pytest.mark.parametrize("batch", [1, 2])
def test_drops_inside_a_layer_before_it_attends_equal_the_full_forward(batch):
    adapter = load_tiny_wan(seed=4, **MODEL)
    result, records, session = recorded(adapter, [LogitDrop(layer=1, count=7)], 5, range(batch))
    assert session.cache.split and len(session.cache.layer_cells(1)) > 1
    assert check_rollout_against_full_forward(adapter, result, records) <= TOLERANCE


# ------------------------------------------------------------------------------------------------ edits
def test_a_merge_equals_attention_over_the_merged_keys_and_values(monkeypatch):
    adapter = load_tiny_wan(seed=5, **MODEL)
    info = adapter.info
    cond = adapter.encode_prompts(["a merged scene"])
    cache = adapter.new_cache(1)
    generator = torch.Generator().manual_seed(0)
    shape = (1, info.latent_channels, 3, info.latent_height, info.latent_width)
    for chunk in range(2):
        adapter_forward(adapter, torch.randn(shape, generator=generator), torch.zeros(1, 3), 3 * chunk, chunk, cache,
                        cond, True)
    keys, values = layer_keys(cache, 0)[:, :96].clone(), layer_keys(cache, 0, name="v")[:, :96].clone()
    target = torch.tensor([[3, 40, 50]])
    sources = torch.tensor([[[3, 4, 5], [40, 60, 70], [50, 51, 90]]])
    weights = torch.rand(1, 3, 3, info.num_heads, generator=generator)
    cache.merge(Merge(target=target, sources=sources, weights=weights), layers=[0])
    merged_k, merged_v = keys.clone(), values.clone()
    for m in range(3):
        merged_k[0, target[0, m]] = (weights[0, m, :, :, None] * keys[0, sources[0, m]]).sum(0)
        merged_v[0, target[0, m]] = (weights[0, m, :, :, None] * values[0, sources[0, m]]).sum(0)
    gone = {4, 5, 60, 70, 51, 90}
    kept = [i for i in range(96) if i not in gone]
    assert cache.head_lengths()[0] == [90] * info.num_heads and cache.head_lengths()[1] == [96] * info.num_heads

    seen = []
    original = wan_adapter.CachedWanAttnProcessor.attention

    def spy(self, query, key, value, mask):
        out = original(self, query, key, value, mask)
        seen.append((query, out))
        return out

    monkeypatch.setattr(wan_adapter.CachedWanAttnProcessor, "attention", spy)
    adapter_forward(adapter, torch.randn(shape, generator=generator), torch.full((1, 3), 500.0), 6, 2, cache, cond,
                    False)
    query, out = seen[0]  # layer 0
    own_k, own_v = layer_keys(cache, 0)[:, 90:138], layer_keys(cache, 0, name="v")[:, 90:138]
    k = torch.cat([merged_k[:, kept], own_k], dim=1).transpose(1, 2)
    v = torch.cat([merged_v[:, kept], own_v], dim=1).transpose(1, 2)
    explicit = F.scaled_dot_product_attention(query.transpose(1, 2), k, v).transpose(1, 2)
    assert (explicit - out).abs().max().item() <= 1e-6
    unmerged = F.scaled_dot_product_attention(query.transpose(1, 2), torch.cat([keys, own_k], 1).transpose(1, 2),
                                              torch.cat([values, own_v], 1).transpose(1, 2)).transpose(1, 2)
    assert (unmerged - out).abs().max().item() > 1e-3


@pytest.mark.parametrize("delta", [5, -2])
def test_a_re_rotation_by_a_frame_delta_equals_rope_at_the_new_positions(delta):
    adapter = load_tiny_wan(seed=6)
    info = adapter.info
    cond = adapter.encode_prompts(["a shifted sink", "another sink"])
    latent = torch.randn(2, info.latent_channels, 3, info.latent_height, info.latent_width,
                         generator=torch.Generator().manual_seed(1))
    shifted, direct = adapter.new_cache(2), adapter.new_cache(2)
    adapter_forward(adapter, latent, torch.zeros(2, 3), 3, 1, shifted, cond, True, rope_start=3)
    adapter_forward(adapter, latent, torch.zeros(2, 3), 3, 1, direct, cond, True, rope_start=3 + delta)
    # layer 0's keys are the input's projections rotated at the positions (deeper layers attend differently)
    before = layer_keys(shifted, 0)[:, :48].clone()
    shifted.shift_frames(torch.full((2, 48), delta))
    got, want = layer_keys(shifted, 0)[:, :48], layer_keys(direct, 0)[:, :48]
    assert (got - want).abs().max().item() <= 1e-5
    assert (before - want).abs().max().item() > 1e-2  # the shift mattered
    assert torch.equal(layer_keys(shifted, 0, name="v")[:, :48], layer_keys(direct, 0, name="v")[:, :48])
    assert torch.equal(shifted.view().rope_pos, direct.view().rope_pos)


@attrs.frozen
class FlushAt(Policy):
    """At chunk ``at``, keep the first frame and the last two frames (Infinity-RoPE's KV flush)."""

    name: ClassVar[str] = "flush-at"
    at: int = 3

    @hookimpl
    def cachepolicy_chunk_start(self, session, chunk):
        if chunk == self.at:
            view = session.cache.view()
            newest = chunk * session.model.frames_per_chunk - 1
            session.cache.flush(view.valid & ((view.frame == 0) | (view.frame >= newest - 1)))


def test_a_flush_equals_the_oracle_that_sees_exactly_the_kept_tokens():
    adapter = load_tiny_wan(seed=7)
    result, records, session = recorded(adapter, [FlushAt(at=3)], 5, [0, 1])
    tpf = adapter.info.tokens_per_frame
    first_after = next(f for f in records["forwards"] if f["chunk"] == 3)
    assert {int(i) // tpf for i in first_after["resident"][0][0][0]} == {0, 7, 8}
    assert session.cache.epoch == 1
    assert check_rollout_against_full_forward(adapter, result, records) <= TOLERANCE


@attrs.frozen
class FixedHeads(Policy):
    """Dummy-Forcing-like roles: heads 0 and 1 keep the newest frame, heads 2 and 3 the last two chunks."""

    name: ClassVar[str] = "fixed-heads"

    @hookimpl
    def cachepolicy_select(self, session, view):
        info = session.model
        newest = (session.chunk + 1) * info.frames_per_chunk - 1
        drop = torch.zeros(info.num_layers, info.num_heads, *view.valid.shape, dtype=torch.bool)
        drop[:, :2] = view.valid & (view.frame < newest)
        drop[:, 2:] = view.valid & (view.frame <= newest - 2 * info.frames_per_chunk)
        return Selection(drop=drop)


def test_bounded_head_groups_allocate_nothing_after_warm_up():
    adapter = load_tiny_wan(seed=8, **MODEL)
    reallocations = []
    session = Session(adapter, [FixedHeads()], RolloutConfig(num_chunks=9, prompts=["x"], seeds=[0]),
                      on_chunk=lambda record: reallocations.append(session.cache.reallocations))
    result = session.run()
    tpf = adapter.info.tokens_per_frame
    assert session.cache.head_lengths() == [[tpf, tpf, 6 * tpf, 6 * tpf]] * MODEL["num_layers"]
    assert reallocations[3:] == [reallocations[3]] * 6  # the split happened once; then buffers are reused
    assert result.trace[-1]["cache_tokens_per_head"] == pytest.approx(3.5 * tpf)
