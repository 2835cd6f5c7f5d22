"""Dummy Forcing: the plugin through the engine against the reference code's recorded run (latents, the head
classification, what every layer and head holds), negative controls, the classification by hand, the policy's
own row generator and the rows file, per-sample decisions and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import ParameterError
from cachepolicy.plugins.dummy_forcing import DummyForcing, assign_groups, frame_masses
from cachepolicy.policy import build_policies
from tests.plugins import golden


@pytest.fixture(scope="module")
def fixture():
    return golden.load("dummy_forcing")


@pytest.fixture(scope="module")
def rows_file(fixture, tmp_path_factory):
    """The reference's sampled query rows (one ``randint`` draw per layer), as the policy's rows file."""
    path = tmp_path_factory.mktemp("rows") / "rows.json"
    path.write_text(json.dumps(fixture.tensors["sampled_rows"].tolist()))
    return path


@pytest.fixture(scope="module")
def reference_run(fixture, rows_file):
    policy, layout = DummyForcing(rows_file=str(rows_file)), golden.HeadLayout()
    result, session = golden.rollout(fixture, [policy], observers=[layout])
    return policy, result, session, session.policy_state[layout.spec]


def test_latents_match_the_reference_over_every_chunk(fixture, reference_run):
    _, result, _, _ = reference_run
    assert result.latents.shape[2] == fixture.reference().shape[2] == 21  # warm-up, classification, 5 chunks after
    errors = golden.chunk_errors(result, fixture)
    assert max(errors) <= golden.TOLERANCE, [f"{e:.2e}" for e in errors]


def test_diffusers_float32_sinusoid_stays_within_the_budget(fixture, rows_file):
    result, _ = golden.rollout(fixture, [DummyForcing(rows_file=str(rows_file))], float64_sinusoid=False)
    assert max(golden.chunk_errors(result, fixture)) <= golden.TOLERANCE


def test_the_classification_matches_the_reference(fixture, reference_run):
    policy, result, session, _ = reference_run
    (recorded,) = fixture.decisions["classification"]
    state = session.policy_state[policy.spec]
    assert torch.allclose(state["probs"][0], torch.tensor(recorded["probs_layer_head_first_mid_last"]), atol=1e-5)
    groups = result.trace[1]["dummy_forcing_groups"][0]
    assert groups == [{k: g[k] for k in ("first", "mid", "dummy")} for g in recorded["groups"]]
    assert groups[1]["mid"] == []  # an empty head group is covered
    assert all("dummy_forcing_groups" not in r for i, r in enumerate(result.trace) if i != 1)
    for call in fixture.decisions["classification_calls"]:
        assert state["rows"][call["layer"]].tolist() == call["query_rows"]


def test_every_layer_and_head_holds_what_the_reference_held(fixture, reference_run):
    _, _, session, held = reference_run
    golden.assert_heads_hold(fixture, held)
    # three head groups, each its own cell (layer 1's mid group is empty: two cells)
    tokens = 12
    lengths = [{cell.heads: cell.lengths[0] for cell in session.cache.layer_cells(layer)} for layer in range(3)]
    assert lengths == [{(0,): tokens, (1, 3): tokens, (2,): 3 * tokens}, {(0, 2, 3): tokens, (1,): tokens},
                       {(0,): tokens, (1, 3): tokens, (2,): 3 * tokens}]


@pytest.mark.parametrize("change", ["rows", "dummy", "local_chunks", "ar_start"])
def test_a_wrong_setting_fails_against_the_reference(fixture, rows_file, change):
    """Negative controls: other rows (the policy's own generator), another dummy fraction, window or chunk."""
    params = {"rows": dict(seed=3), "dummy": dict(dummy=0.25, rows_file=str(rows_file)),
              "local_chunks": dict(local_chunks=2, rows_file=str(rows_file)),
              "ar_start": dict(ar_start=2, rows_file=str(rows_file))}[change]
    result, _ = golden.rollout(fixture, [DummyForcing(**params)], chunks=4)
    errors = golden.chunk_errors(result, fixture)
    assert errors[0] <= golden.TOLERANCE < 1e-3 < max(errors)  # the same first chunk, then not


# --------------------------------------------------------------------------------------------------
# The pieces, by hand
# --------------------------------------------------------------------------------------------------


def test_frame_masses_and_the_global_assignment_by_hand():
    resident = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.0, 0.1]]])  # B=1, H=2, S=3 (token 0 is the sink)
    own = torch.tensor([[[0.25, 0.15], [0.3, 0.2]]])
    masses = frame_masses(resident, own, torch.tensor([[True, False, False]]))
    assert torch.allclose(masses, torch.tensor([[[0.1, 0.5, 0.4], [0.4, 0.1, 0.5]]]))
    probs = torch.tensor([[[0.10, 0.30, 0.6], [0.30, 0.10, 0.6]], [[0.05, 0.05, 0.9], [0.20, 0.40, 0.4]]])
    # p0n = [.1, .3, .05, .2] / .65, p1n = [.3, .1, .05, .4] / .85; cost = max -> lowest two: head (1,0), (0,0)
    groups = assign_groups(probs, 2)
    assert groups.tolist() == [[2, 0], [2, 1]]
    assert assign_groups(probs, 0).tolist() == [[1, 0], [0, 1]]


def test_the_policy_owns_its_row_generator(fixture):
    info = fixture.adapter().info
    rows = DummyForcing(seed=7).query_rows(info)
    assert rows.shape == (3, 4) and int(rows.max()) < 36  # tokens_per_frame // 3 rows per layer, in the chunk
    torch.manual_seed(0)
    first = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(DummyForcing(seed=7).query_rows(info), rows)  # the global generator is left alone
    assert torch.equal(torch.rand(3), first)
    assert not torch.equal(DummyForcing(seed=8).query_rows(info), rows)
    assert DummyForcing(rows=9).query_rows(info).shape == (3, 9)


@pytest.mark.parametrize("content,message", [
    ("[[1, 2], [3, 4]]", "must hold 3 non-empty lists of equal length"),
    ("[[1, 2], [3, 4], [5]]", "must hold 3 non-empty lists of equal length"),
    ("[[1, 2], [3, 4], [5, 36]]", r"holds row 36; rows index the chunk's 36 query tokens \(0..35\)"),
    ('{"rows": [[1], [2], [true]]}', "holds row True"),
    ("[[1, 2", "is not readable JSON"),
])
def test_a_bad_rows_file_is_refused_before_anything_runs(fixture, tmp_path, content, message):
    path = tmp_path / "rows.json"
    path.write_text(content)
    session = Session(fixture.adapter(), [DummyForcing(rows_file=str(path))],
                      RolloutConfig(num_chunks=2, prompts=["a"], seeds=[0]))
    with pytest.raises(ParameterError, match=message):
        session.check()


def test_bad_parameters_are_refused(tmp_path):
    registry = {"dummy-forcing": DummyForcing}
    for spec, message in (("dummy-forcing:ar_start=0", "ar_start=0 is not allowed; it must be a positive integer"),
                          ("dummy-forcing:dummy=1.2", r"dummy=1.2 is not allowed; it must be a finite number in "
                                                      r"\[0.0, 1.0\]"),
                          ("dummy-forcing:local_chunks=0", "local_chunks=0 is not allowed")):
        with pytest.raises(ParameterError, match=message):
            build_policies(spec, registry)
    policy = DummyForcing(rows_file=str(tmp_path / "missing.json"))
    with pytest.raises(ParameterError, match="is not a file"):
        policy.check_compatible(golden.load("dummy_forcing").adapter().info)


def test_a_batch_classifies_per_sample_as_each_sample_alone(tiny_wan):
    adapter = tiny_wan(seed=2, num_layers=3, num_attention_heads=4, attention_head_dim=12)
    policy = DummyForcing(seed=1)
    prompts, seeds = ["a red square", "a blue circle at night"], [3, 4]
    batch = Session(adapter, [policy], RolloutConfig(num_chunks=4, prompts=prompts, seeds=seeds))
    together = batch.run()
    groups = together.trace[1]["dummy_forcing_groups"]
    for b in range(2):
        alone = Session(adapter, [policy], RolloutConfig(num_chunks=4, prompts=[prompts[b]], seeds=[seeds[b]])).run()
        assert (alone.latents[0] - together.latents[b]).abs().max().item() <= 1e-5
        assert alone.trace[1]["dummy_forcing_groups"][0] == groups[b]
    assert groups[0] != groups[1]  # the samples did classify differently
