"""Forcing-KV: the plugin through the engine against the reference code's recorded run (latents, segment
selections, what every layer and head holds), negative controls, head-role files (the reference's format, a
model of another size refused), per-sample decisions and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import torch

from cachepolicy.calibrate import head_roles_json
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import CompositionError, ParameterError
from cachepolicy.plugins.forcing_kv import (
    ForcingKV,
    bottom_segments,
    kept_segments,
    parse_head_roles,
    read_head_roles,
    segment_scores,
)
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import Policy, Selection, build_policies
from tests.plugins import golden

ROLES = str(golden.FIXTURES / "forcing_kv" / "heads_tiny.json")


@pytest.fixture(scope="module")
def fixture():
    return golden.load("forcing_kv")


@pytest.fixture(scope="module")
def reference_run(fixture):
    policy, layout = ForcingKV(roles=ROLES), golden.HeadLayout()
    result, session = golden.rollout(fixture, [policy], observers=[layout])
    return policy, result, session, session.policy_state[layout.spec]


# --------------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------------


def test_latents_match_the_reference_over_every_chunk(fixture, reference_run):
    _, result, _, _ = reference_run
    assert result.latents.shape[2] == fixture.reference().shape[2] == 24  # 8 chunks: warm-up, split, 6 selections
    errors = golden.chunk_errors(result, fixture)
    assert max(errors) <= golden.TOLERANCE, [f"{e:.2e}" for e in errors]


def test_diffusers_float32_sinusoid_stays_within_the_budget(fixture):
    result, _ = golden.rollout(fixture, [ForcingKV(roles=ROLES)], float64_sinusoid=False)
    assert max(golden.chunk_errors(result, fixture)) <= golden.TOLERANCE


def test_segment_selections_match_the_reference(fixture, reference_run):
    policy, result, session, _ = reference_run
    state = session.policy_state[policy.spec]
    recorded = fixture.decisions["segment_selections"]
    assert sorted(state["kept"]) == [r["chunk"] for r in recorded] == list(range(2, 8))
    for record in recorded:
        chunk = record["chunk"]
        assert state["kept"][chunk][0].tolist() == record["keep_chunk_indices"], chunk
        assert torch.allclose(state["scores"][chunk][0], torch.tensor(record["patch_scores"]), atol=1e-5), chunk
        trace = result.trace[chunk]["forcing_kv_segments"][0]
        assert trace == record["keep_frame_segment"], chunk


def test_every_layer_and_head_holds_what_the_reference_held(fixture, reference_run):
    _, _, session, held = reference_run
    golden.assert_heads_hold(fixture, held)
    # the split is real: separate head groups, each attended over its own tokens
    assert [len(session.cache.layer_cells(layer)) for layer in range(3)] == [1, 2, 2]
    lengths = {cell.heads: cell.lengths for cell in session.cache.layer_cells(2)}
    assert lengths == {(1,): [24], (0, 2, 3): [24 + 12]}  # static: sink + anchor; dynamic: + 6 segments of 2 tokens


@pytest.mark.parametrize("change", ["retention", "roles", "ar_start", "segments"])
def test_a_wrong_setting_fails_against_the_reference(fixture, tmp_path, change):
    """Negative controls: each setting the reference was run with matters (first 5 chunks)."""
    roles = Path(ROLES)
    if change == "roles":  # layer 2 with the static and dynamic heads of layer 1
        payload = json.loads(roles.read_text())
        payload["layers"][2] = {"layer_idx": 2, "static_head": [0, 2], "dynamic_head": [1, 3]}
        roles = tmp_path / "roles.json"
        roles.write_text(json.dumps(payload))
    params = {"retention": dict(retention=0.5), "roles": {}, "ar_start": dict(ar_start=2),
              "segments": dict(segments=3, retention=0.66)}[change]
    result, _ = golden.rollout(fixture, [ForcingKV(roles=str(roles), **params)], chunks=5)
    errors = golden.chunk_errors(result, fixture)
    assert max(errors[:2]) <= golden.TOLERANCE < 1e-3 < max(errors)  # identical through the warm-up, then not


# --------------------------------------------------------------------------------------------------
# The pieces, by hand
# --------------------------------------------------------------------------------------------------


def test_segment_scores_and_the_global_bottom_k_by_hand():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 4, 12, 3, 5, generator=generator)  # B=2, 3 candidate frames + boundary, 12 tokens
    scores = segment_scores(keys, 6)
    assert scores.shape == (2, 3, 6)
    b, t, j = 1, 2, 4
    a, c = keys[b, t, 8:10].reshape(2, -1), keys[b, t + 1, 8:10].reshape(2, -1)
    by_hand = ((a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1))).mean()
    assert abs(float(scores[b, t, j]) - float(by_hand)) < 1e-6
    chosen = bottom_segments(scores, 6)
    assert chosen.shape == (2, 6) and bool((chosen[:, 1:] > chosen[:, :-1]).all())
    for sample in range(2):
        assert set(chosen[sample].tolist()) == set(scores[sample].flatten().argsort()[:6].tolist())
    assert kept_segments(3, 6, 0.33) == 6 and kept_segments(3, 6, 0.0) == 0 and kept_segments(3, 6, 1.0) == 18


def self_forcing_like_roles(num_layers: int = 30, num_heads: int = 12, seed: int = 0) -> dict:
    """A file laid out exactly as the reference's shipped ``configs_head/forcingkv_heads_selfforcing.json``
    (30 layers x 12 heads, 134 static / 226 dynamic), with other (random) roles."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_layers * num_heads, generator=generator)
    static = set(order[:134 * num_layers * num_heads // 360].tolist())
    layers = [[h for h in range(num_heads) if layer * num_heads + h in static] for layer in range(num_layers)]
    payload = head_roles_json(layers, [[h for h in range(num_heads) if h not in s] for s in layers],
                              profile="selfforcing_naive_sink_3_thr08",
                              description="naive_sink_3_thr08: classify head as static when last-4-key-frame mass / "
                                          "mass over key frames [3:] >= 0.800000; otherwise dynamic.")
    assert list(payload) == ["format", "profile", "num_layers", "num_heads", "description", "layers"]
    return payload


def test_a_file_in_the_shipped_self_forcing_format_loads_and_drives_a_30_layer_12_head_model(tiny_wan, tmp_path):
    payload = self_forcing_like_roles()
    path = tmp_path / "forcingkv_heads_selfforcing.json"
    path.write_text(json.dumps(payload, indent=2))
    roles = read_head_roles(path, 30, 12)
    assert roles.counts() == (134, 226)
    adapter = tiny_wan(seed=3, num_layers=30, num_attention_heads=12, attention_head_dim=12, latent_size=(6, 8))
    (policy,) = build_policies(f"forcing-kv:roles={path}", {"forcing-kv": ForcingKV})
    session = Session(adapter, [policy], RolloutConfig(num_chunks=4, prompts=["a"], seeds=[0]))
    result = session.run()
    assert bool(torch.isfinite(result.latents).all())
    tokens = adapter.info.tokens_per_frame
    for layer in range(30):
        cells = session.cache.layer_cells(layer)
        if layer == 0 or not roles.dynamic[layer] or not roles.static[layer]:
            assert len(cells) == 1
            continue
        by_heads = {cell.heads: cell.lengths[0] for cell in cells}
        assert by_heads == {roles.static[layer]: 2 * tokens, roles.dynamic[layer]: 3 * tokens}
    assert result.trace[-1]["forcing_kv_segments"][0] and "forcing_kv_segments" not in result.trace[1]


SHIPPED_ROLES = "configs_head/forcingkv_heads_selfforcing.json"


@pytest.mark.skipif(not os.environ.get("FORCING_KV_CHECKOUT"),
                    reason="needs a checkout of zju-jiyicheng/Forcing-KV in FORCING_KV_CHECKOUT (its files are not "
                           "committed here); the lookalike test above covers the format")
def test_the_self_forcing_file_shipped_with_the_reference_drives_the_policy(tiny_wan):
    """The reference's own role file (checked at 50ac1f45: 134 static / 226 dynamic heads) on a 30 x 12 model."""
    path = Path(os.environ["FORCING_KV_CHECKOUT"]) / SHIPPED_ROLES
    roles = read_head_roles(path, 30, 12)
    assert roles.counts() == (134, 226)
    adapter = tiny_wan(seed=3, num_layers=30, num_attention_heads=12, attention_head_dim=12, latent_size=(6, 8))
    session = Session(adapter, [ForcingKV(roles=str(path))], RolloutConfig(num_chunks=4, prompts=["a"], seeds=[0]))
    result = session.run()
    assert bool(torch.isfinite(result.latents).all())
    tokens = adapter.info.tokens_per_frame
    for layer in range(1, 30):
        by_heads = {cell.heads: cell.lengths[0] for cell in session.cache.layer_cells(layer)}
        assert by_heads == {roles.static[layer]: 2 * tokens, roles.dynamic[layer]: 3 * tokens}


def test_roles_for_a_model_of_another_size_are_refused(fixture, tiny_wan, tmp_path):
    path = tmp_path / "roles.json"
    path.write_text(json.dumps(self_forcing_like_roles()))
    adapter = fixture.adapter()  # 3 layers x 4 heads
    session = Session(adapter, [ForcingKV(roles=str(path))], RolloutConfig(num_chunks=2, prompts=["a"], seeds=[0]))
    with pytest.raises(ParameterError, match="for a model of 30 layers x 12 heads; this model has 3 layers x 4 heads"):
        session.run()
    bare = [{"layer_idx": i, "static_head": [0], "dynamic_head": [1, 2, 3]} for i in range(5)]  # no counts given
    with pytest.raises(ParameterError, match="at least 5 layers x 4 heads; this model has 3 layers x 4 heads"):
        parse_head_roles({"layers": bare}, 3, 4)
    with pytest.raises(ParameterError, match=r"layer_idx -2 is not a layer of this model \(0..2\)"):
        parse_head_roles([{"layer_idx": -2, "static_head": [0], "dynamic_head": [1, 2, 3]}], 3, 4)


@pytest.mark.parametrize("layers,message", [
    ([{"layer_idx": 1, "static_head": [0, 1], "dynamic_head": [1, 2, 3]}], "exactly once"),
    ([{"layer_idx": 1, "static_head": [0], "dynamic_head": [1, 2]}], "exactly once"),
    ([{"layer_idx": 1, "static_head": [0, 7], "dynamic_head": [1, 2, 3]}], "at least 2 layers x 8 heads; this model "
                                                                             "has 3 layers x 4 heads"),
    ([{"layer_idx": 1, "static_head": [0, -1], "dynamic_head": [1, 2, 3]}], r"names heads \[-1\]"),
    ([{"layer_idx": 1, "static_head": [0, 1], "dynamic_head": [2, 3]}], r"do not list layer\(s\) \[2\]"),
    ([{"layer_idx": 1, "static_head": [0, 1], "dynamic_head": [2, 3]}] * 2, "listed twice"),
    ([{"layer_idx": 1, "static_head": "0,1", "dynamic_head": [2, 3]}], "must be a list of head indices"),
    ("static", "the Forcing-KV head file format"),
])
def test_malformed_role_files_are_refused(layers, message):
    with pytest.raises(ParameterError, match=message):
        parse_head_roles({"layers": layers}, 3, 4)


def test_alternative_keys_and_a_layer_dict_load_as_in_the_reference():
    roles = parse_head_roles({"layers": {"1": {"spatial_heads": [0], "temporal_head": [1, 2, 3]},
                                         "2": {"local_head": [0, 1], "dynamic_heads": [2, 3]}}}, 3, 4)
    assert roles.static == ((0, 1, 2, 3), (0,), (0, 1)) and roles.dynamic == ((), (1, 2, 3), (2, 3))


def test_bad_parameters_are_refused_before_anything_runs(fixture, tmp_path):
    registry = {"forcing-kv": ForcingKV}
    with pytest.raises(ParameterError, match="needs parameter"):
        build_policies("forcing-kv", registry)
    with pytest.raises(ParameterError, match=r"retention=1.5 is not allowed; it must be a finite number in \[0.0, 1.0\]"):
        build_policies("forcing-kv:roles=x.json,retention=1.5", registry)
    adapter = fixture.adapter()
    for policy, message in ((ForcingKV(roles=ROLES, segments=5), r"segments=5 does not divide the model's 12 tokens "
                                                                 r"per frame; choose a divisor \(1, 2, 3, 4, 6, 12\)"),
                            (ForcingKV(roles=str(tmp_path / "none.json")), "is not a file"),):
        session = Session(adapter, [policy], RolloutConfig(num_chunks=2, prompts=["a"], seeds=[0]))
        with pytest.raises(ParameterError, match=message):
            session.check()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ParameterError, match="is not readable JSON"):
        read_head_roles(bad, 3, 4)


# --------------------------------------------------------------------------------------------------
# Per sample, composition
# --------------------------------------------------------------------------------------------------


def test_a_batch_decides_per_sample_as_each_sample_alone(tiny_wan):
    adapter = tiny_wan(seed=4, num_layers=3, num_attention_heads=4, attention_head_dim=12, latent_size=(6, 8))
    policy = ForcingKV(roles=ROLES)
    batch = Session(adapter, [policy], RolloutConfig(num_chunks=5, prompts=["a cat", "a dog"], seeds=[0, 1]))
    together = batch.run()
    kept = batch.policy_state[policy.spec]["kept"]
    for b, (prompt, seed) in enumerate((("a cat", 0), ("a dog", 1))):
        alone = Session(adapter, [policy], RolloutConfig(num_chunks=5, prompts=[prompt], seeds=[seed]))
        result = alone.run()
        assert (result.latents[0] - together.latents[b]).abs().max().item() <= 1e-5
        for chunk, chosen in alone.policy_state[policy.spec]["kept"].items():
            assert chosen[0].tolist() == kept[chunk][b].tolist()
    assert any(kept[c][0].tolist() != kept[c][1].tolist() for c in kept)  # the samples did decide differently


@attrs.frozen
class DropCorner(Policy):
    """Drops token 0 of the newest frame from layer 1 at every selection."""

    name: ClassVar[str] = "drop-corner"

    @hookimpl
    def cachepolicy_select(self, session, view):
        drop = torch.zeros(session.model.num_layers, *view.valid.shape, dtype=torch.bool)
        newest = (session.chunk + 1) * session.model.frames_per_chunk - 1
        drop[1] = view.valid & (view.frame == newest) & (view.spatial_index == 0)
        return Selection(drop=drop)


def test_a_policy_that_drops_the_scored_keys_is_named(fixture):
    with pytest.raises(CompositionError, match="frames 5..8 in layer 1, .* another composed policy dropped them"):
        golden.rollout(fixture, [ForcingKV(roles=ROLES), DropCorner()], chunks=4)
