"""The per-forward hooks and what they see: scoring helpers against explicit formulas, RoPE position moves,
noise sources, the committed latent at ``select``, the opt-in residency trace, and policy errors named."""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import pytest
import torch

from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import CompositionError, ParameterError, PolicyHookError, RolloutConfigError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerRequest, RopePositions
from cachepolicy.models import Sampler
from cachepolicy.noise import RecordedNoise, SeededNoise, noise_seed
from cachepolicy.policy import Policy, Selection

FAST = Sampler(denoising_steps=(1000, 500), shift=3.0)


def run(adapter, policies, chunks=3, seeds=(0, 1), **config):
    prompts = config.pop("prompts", [f"prompt {s}" for s in seeds])
    session = Session(adapter, policies, RolloutConfig(num_chunks=chunks, prompts=prompts, seeds=list(seeds),
                                                       sampler=config.pop("sampler", FAST), **config))
    return session, session.run()


@attrs.frozen
class Probe(Policy):
    """Records, at the first call of chunk 2 in layer 1, the scoring helpers and the tensors to check them."""

    name: ClassVar[str] = "probe"

    def new_state(self):
        return {}

    @hookimpl
    def cachepolicy_layer_request(self, session, call):
        return LayerRequest(layers=[1]) if call.first and call.chunk == 2 else None

    @hookimpl
    def cachepolicy_layer(self, session, layer):
        rows = layer.query[:, :5]
        self.state(session).update(
            logits=layer.logits(rows), mass=layer.attention_mass(rows), rows=rows, keys=layer.cells[0].rotated_keys,
            own=layer.key, valid=layer.view.valid, phase=layer.call.phase, index=layer.index,
            raw_diff=float((layer.query - layer.query_raw).abs().max()))


@pytest.mark.parametrize("rope_mode", ["absolute", "raw"])
def test_scoring_helpers_equal_the_formulas(tiny_wan, rope_mode):
    adapter = tiny_wan(seed=1, num_attention_heads=3, attention_head_dim=8)

    @attrs.frozen
    class RawProbe(Probe):
        name: ClassVar[str] = "raw-probe"
        rope_mode: ClassVar[str | None] = "raw"

    probe = Probe() if rope_mode == "absolute" else RawProbe()
    session, _ = run(adapter, [probe])
    state = session.policy_state[probe.spec]
    assert state["index"] == 1 and state["phase"] == "step" and state["raw_diff"] > 1e-3  # RoPE applied
    rows, keys, own = state["rows"].float(), state["keys"].float(), state["own"].float()
    scale = 1 / math.sqrt(rows.shape[-1])
    expected = torch.einsum("brhd,bshd->bhs", rows, keys) * scale  # every resident token held by every head
    assert torch.allclose(state["logits"], expected, atol=1e-5)
    scores = torch.einsum("brhd,bshd->bhrs", rows, torch.cat([keys, own], dim=1)) * scale
    probs = scores.softmax(dim=-1).mean(dim=2)
    size = keys.shape[1]
    assert torch.allclose(state["mass"].resident, probs[..., :size], atol=1e-6)
    assert torch.allclose(state["mass"].own, probs[..., size:], atol=1e-6)
    total = state["mass"].resident.sum(-1) + state["mass"].own.sum(-1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def test_scoring_helpers_mark_tokens_a_head_does_not_hold(tiny_wan):
    @attrs.frozen
    class HeadDrop(Policy):
        name: ClassVar[str] = "head-drop"

        @hookimpl
        def cachepolicy_select(self, session, view):
            info = session.model
            drop = torch.zeros(info.num_layers, info.num_heads, *view.valid.shape, dtype=torch.bool)
            drop[1, 0] = view.valid & (view.frame == 0)  # layer 1, head 0 forgets frame 0
            return Selection(drop=drop)

    probe = Probe()
    session, _ = run(tiny_wan(seed=2), [HeadDrop(), probe], seeds=(0,))
    state = session.policy_state[probe.spec]
    frame0 = torch.arange(state["logits"].shape[-1]) < session.model.tokens_per_frame
    assert bool(torch.isinf(state["logits"][0, 0, frame0]).all())
    assert bool(torch.isfinite(state["logits"][0, 1]).all())
    assert bool((state["mass"].resident[0, 0, frame0] == 0).all())


@attrs.frozen
class ShiftAll(Policy):
    """Moves every RoPE position of every call by ``by`` frames (resident keys and the call's own)."""

    name: ClassVar[str] = "shift-all"
    rope_mode: ClassVar[str | None] = "raw"
    by: int = 40
    own: bool = True

    @hookimpl
    def cachepolicy_rope_positions(self, session, call):
        view = session.cache.view()
        return RopePositions(resident=view.rope_pos + self.by, own_start=call.rope_start + self.by if self.own else None)


def test_moving_every_position_by_the_same_frames_changes_nothing_but_moving_some_does(tiny_wan):
    """RoPE attention depends on position differences only: a policy that moves all positions by one constant
    reproduces the unmoved rollout (rounding aside); moving only the resident keys does not."""
    _, plain = run(tiny_wan(seed=3), [])
    session, moved = run(tiny_wan(seed=3), [ShiftAll()])
    assert session.cache.rope_mode == "raw"
    assert (moved.latents - plain.latents).abs().max().item() <= 1e-5
    _, partial = run(tiny_wan(seed=3), [ShiftAll(own=False)])
    assert (partial.latents - plain.latents).abs().max().item() > 1e-3


def test_two_policies_moving_positions_is_a_composition_error(tiny_wan):
    @attrs.frozen
    class Other(ShiftAll):
        name: ClassVar[str] = "other-shift"

    with pytest.raises(CompositionError, match="all move RoPE positions"):
        run(tiny_wan(), [ShiftAll(), Other()])


def test_recorded_noise_reproduces_the_seeded_draws_and_names_a_missing_one(tiny_wan):
    _, seeded = run(tiny_wan(seed=4), [], chunks=2)
    shape = (4, 3, 8, 8)
    draws = {(chunk, use): torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        noise_seed(seed, chunk, use))) for seed in (0, 1)]) for chunk in range(2) for use in range(2)}
    _, recorded = run(tiny_wan(seed=4), [], chunks=2, noise=RecordedNoise(draws))
    assert torch.equal(recorded.latents, seeded.latents)
    del draws[(1, 1)]
    with pytest.raises(ParameterError, match="recorded noise has no draw for chunk 1, use 1"):
        run(tiny_wan(seed=4), [], chunks=2, noise=RecordedNoise(draws))
    with pytest.raises(RolloutConfigError, match="noise must be a NoiseSource"):
        RolloutConfig(num_chunks=1, prompts=["a"], seeds=[0], noise="seeded")
    _, again = run(tiny_wan(seed=4), [], chunks=2, noise=SeededNoise())
    assert torch.equal(again.latents, seeded.latents)


def test_select_sees_the_latent_of_the_chunk_it_selects_on(tiny_wan):
    @attrs.frozen
    class Seen(Policy):
        name: ClassVar[str] = "seen"

        def new_state(self):
            return []

        @hookimpl
        def cachepolicy_select(self, session, view):
            self.state(session).append((session.chunk, len(session.latents), session.latents[-1].clone()))

    policy = Seen()
    session, result = run(tiny_wan(seed=5), [policy], chunks=3)
    calls = session.policy_state[policy.spec]
    assert [(chunk, count) for chunk, count, _ in calls] == [(0, 1), (1, 2), (2, 3)]
    for chunk, _, latent in calls:
        assert torch.equal(latent, result.latents[:, :, 3 * chunk:3 * chunk + 3])


def test_the_residency_trace_lists_what_each_layer_and_head_holds(tiny_wan, registry):
    from cachepolicy.policy import build_policies

    policies = build_policies("attention-sink:frames=3+sliding-window:frames=3", registry.policies)
    _, result = run(tiny_wan(seed=6), policies, chunks=4, seeds=(0,), trace_residency=True)
    assert result.trace[-1]["residency"] == [{"frames": {str(f): "all" for f in (0, 1, 2, 9, 10, 11)}}]
    _, plain = run(tiny_wan(seed=6), policies, chunks=2, seeds=(0,))
    assert "residency" not in plain.trace[-1]

    @attrs.frozen
    class LayerOneForgets(Policy):
        name: ClassVar[str] = "layer-one-forgets"

        @hookimpl
        def cachepolicy_select(self, session, view):
            drop = torch.zeros(session.model.num_layers, *view.valid.shape, dtype=torch.bool)
            drop[1] = view.valid & (view.frame == 0) & (view.spatial_index < 4)
            return Selection(drop=drop)

    _, split = run(tiny_wan(seed=6), [LayerOneForgets()], chunks=2, seeds=(0,), trace_residency=True)
    record = split.trace[-1]["residency"][0]
    layer1 = next(cell for cell in record["cells"] if cell["layer"] == 1)
    assert layer1["frames"]["0"] == list(range(4, 16)) and layer1["heads"] == [0, 1]
    assert record["frames"]["0"] == "all" and split.trace[-1]["cache_tokens_per_head"] == pytest.approx(94.0)


def test_a_policy_error_names_the_policy_and_its_hook(tiny_wan):
    @attrs.frozen
    class Broken(Policy):
        name: ClassVar[str] = "broken"

        @hookimpl
        def cachepolicy_chunk_start(self, session, chunk):
            if chunk == 1:
                raise KeyError("oops")

    session = Session(tiny_wan(), [Broken()], RolloutConfig(num_chunks=3, prompts=["a"], seeds=[0], sampler=FAST))
    with pytest.raises(PolicyHookError, match="policy 'broken' failed in cachepolicy_chunk_start: KeyError: 'oops'") \
            as info:
        session.run()
    assert info.value.policy == "broken" and len(session.latents) == 1  # what finished is kept

    @attrs.frozen
    class WrongType(Policy):
        name: ClassVar[str] = "wrong-type"

        @hookimpl
        def cachepolicy_select(self, session, view):
            return "drop everything"

    with pytest.raises(CompositionError, match="policy wrong-type returned str from cachepolicy_select"):
        run(tiny_wan(), [WrongType()])


def test_a_policy_that_writes_non_finite_keys_is_blamed(tiny_wan):
    @attrs.frozen
    class Poison(Policy):
        name: ClassVar[str] = "poison"

        @hookimpl
        def cachepolicy_after_compaction(self, session, chunk):
            if chunk == 1:
                session.cache.layer_cells(0)[0].k[:, 0] = float("nan")

    with pytest.raises(Exception, match="a policy that edits the cache wrote them, not the model: one of poison"):
        run(tiny_wan(), [Poison()], chunks=3)
