"""outlier-trim: the per-token scores and the adaptive set by hand, the trigger and the pruning of the previous
chunk's frames only through the real engine (scripted and tiny-wan), batching, and bad input."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.cache import CacheView
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import ParameterError
from cachepolicy.models import Sampler
from cachepolicy.plugins.outlier_trim import OutlierTrim, outlier_scores, outlier_set, previous_chunk_prune_mask
from cachepolicy.policy import build_policies
from tests.plugins.scripted import ScriptedAdapter

TOLERANCE = 1e-5
STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "fault_study.py"


def approx_list(values):
    return [None if v is None else pytest.approx(v, abs=TOLERANCE) for v in values]


def column(trace, key, sample):
    return [record[key][sample] for record in trace]


# --------------------------------------------------------------------------------------------------
# The maths, by hand
# --------------------------------------------------------------------------------------------------


def test_scores_use_each_tokens_own_history_with_a_pooled_floor():
    # T = 2, N = 3. mu = [5, 0, 0]; sigma = [5, 0, 0]; all six values [0, 0, 0, 10, 0, 0]: mean 10/6,
    # population variance (5 * (10/6)^2 + (50/6)^2) / 6 = 125/9 -> pool = sqrt(125)/3 = 3.7268.
    history = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    pool = math.sqrt(125) / 3
    z = outlier_scores(torch.tensor([20.0, 1.0, 0.0]), history)
    # token 0 is judged by its own spread (5 > pool): (20 - 5) / 5 = 3; tokens 1 and 2 by the pool
    assert z.tolist() == pytest.approx([3.0, 1.0 / pool, 0.0], abs=1e-6)


def test_scores_without_any_spread_are_signed_infinities():
    history = torch.tensor([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])  # sigma 0 and pool 0
    z = outlier_scores(torch.tensor([1.0, 2.0, 3.0]), history)
    assert z.tolist() == [-math.inf, 0.0, math.inf]


def test_scores_refuse_mismatched_shapes():
    with pytest.raises(ParameterError, match=r"drift \[N\] and a history \[T, N\]; got \(3,\) and \(2, 4\)"):
        outlier_scores(torch.zeros(3), torch.zeros(2, 4))


def test_the_set_is_every_score_above_z_set_so_its_size_adapts():
    scores = torch.tensor([1.0, 5.0, 5.0, 2.0, 9.0])
    assert outlier_set(scores, 4.0).tolist() == [4, 1, 2]          # ties of 5 -> the lower index first
    assert outlier_set(scores, 5.0).tolist() == [4]                # strict: 5 is not above 5
    assert outlier_set(scores, 9.0).tolist() == []                 # nothing: a quiet chunk prunes nothing
    assert outlier_set(scores, 0.5).tolist() == [4, 1, 2, 3, 0]    # everything


def test_prune_mask_restricted_to_the_previous_chunk():
    # N = 2 tokens per frame, one frame per chunk, chunks 0, 1, 2 resident for both samples
    chunk = torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    spatial = torch.tensor([[0, 1, 0, 1, 0, 1]] * 2)
    valid = torch.ones(2, 6, dtype=torch.bool)
    view = CacheView(frame=chunk, chunk=chunk, row=spatial // 2, col=spatial % 2, rope_pos=chunk,
                     pinned=torch.zeros_like(valid), valid=valid, token_cols=2)
    only_1 = previous_chunk_prune_mask(view, [[1], []], 1, 2)
    assert only_1.tolist() == [[False, False, False, True, False, False], [False] * 6]
    every = previous_chunk_prune_mask(view, [[1], [0]], None, 2)
    assert every.tolist() == [[False, True, False, True, False, True], [True, False, True, False, True, False]]


# --------------------------------------------------------------------------------------------------
# Through the real engine on a scripted model (N = 4 tokens, D = 1, one frame per chunk)
# --------------------------------------------------------------------------------------------------

# Sample 0: drifts [1, 0, 0, 0] and [1, 0, 0, 0.5] at chunks 1 and 2; chunk 3 jumps by 4 and 5 at tokens 1
# and 2 until something is pruned; chunk 4 drifts by 1 at tokens 0 and 3.
# Sample 1 drifts by [0, 1, 0, 0] every chunk: each token equals its own mean, never an outlier.
SCRIPT = {
    0: [[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0.5], [3, 4, 5, 0.5], [4, 0, 0, 1.5]],
    1: [[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 3, 0, 0], [0, 4, 0, 0]],
}
HEALED = [3, 0, 0, 0.5]  # sample 0, chunk 3, once its cache lost tokens


def script(sample: int, chunk: int, pruned: bool) -> list[float]:
    if sample == 0 and chunk == 3 and pruned:
        return HEALED
    return SCRIPT[sample][chunk]


def run_scripted(spec: str, registry, batch: int = 2):
    adapter = ScriptedAdapter(script, 4)
    session = Session(adapter, build_policies(spec, registry.policies),
                      RolloutConfig(num_chunks=5, prompts=["x"] * batch, seeds=list(range(batch))))
    return session, session.run()


# History of sample 0 at chunk 3: rows [1, 0, 0, 0] and [1, 0, 0, 0.5]. mu = [1, 0, 0, 0.25], sigma = [0, 0, 0,
# 0.25]; the 8 values have mean 0.3125 and population variance 2.25/8 - 0.3125^2 = 0.18359375 (pool 0.42848).
POOL = math.sqrt(2.25 / 8 - 0.3125 ** 2)


def test_hand_computed_rollout(registry):
    session, result = run_scripted("outlier-trim:z_trigger=10,z_set=5", registry)
    trace = result.trace
    # chunk 3's first attempt drifts [1, 4, 5, 0]: z = [0, 4/pool, 5/pool, -0.25/pool] = [0, 9.34, 11.67, -0.58];
    # 11.67 > 10 triggers, the set is {2, 1} (z > 5): two tokens, not a fixed fraction. The healed attempt
    # drifts [1, 0, 0, 0]: z max 0. Chunk 3 triggered, so its drift is not recorded: chunk 4 (drift
    # [1, 0, 0, 1]) is scored against chunks 1 and 2 alone: token 3 (1 - 0.25) / pool = 1.7504.
    assert column(trace, "severity", 0) == approx_list([None, None, None, 0.0, 0.75 / POOL])  # accepted attempts
    assert trace[3]["severity_attempts"][0] == approx_list([5 / POOL, 0.0])
    assert column(trace, "threshold", 0) == [None, None, None, 10.0, 10.0]
    assert column(trace, "triggered", 0) == [False, False, False, True, False]
    assert column(trace, "unstable_size", 0) == [0, 0, 0, 2, 0]
    assert column(trace, "pruned_positions", 0) == [[], [], [], [1, 2], []]
    assert column(trace, "tokentrim_retries", 0) == [0, 0, 0, 1, 0]
    # sample 1: every token at its own mean, z = 0; only recomputed during sample 0's retry
    assert column(trace, "severity", 1) == approx_list([None, None, None, 0.0, 0.0])
    assert column(trace, "triggered", 1) == [False] * 5
    assert trace[3]["retries_per_sample"] == [1, 0]
    # prune=previous: positions 1 and 2 of chunk 2's frame only (2 tokens); chunks 0 and 1 keep them
    assert list(trace[3]["dropped_tokens"].values()) == [2]
    view = session.cache.view()
    resident = {(int(c), int(s)) for c, s, v in zip(view.chunk[0], view.spatial_index[0], view.valid[0]) if v}
    assert (2, 1) not in resident and (2, 2) not in resident
    assert {(0, 1), (0, 2), (1, 1), (1, 2), (2, 0), (2, 3)} <= resident
    assert result.latents[0, 0, 3, 0].tolist() == pytest.approx(HEALED, abs=TOLERANCE)


def test_prune_all_drops_the_positions_in_every_cached_frame(registry):
    session, result = run_scripted("outlier-trim:z_trigger=10,z_set=5,prune=all", registry)
    assert list(result.trace[3]["dropped_tokens"].values()) == [6]  # positions 1, 2 of chunks 0, 1, 2
    view = session.cache.view()
    resident = {(int(c), int(s)) for c, s, v in zip(view.chunk[0], view.spatial_index[0], view.valid[0]) if v}
    assert not any(c < 3 and s in (1, 2) for c, s in resident)


def test_trigger_threshold_and_set_threshold_are_separate(registry):
    # z_trigger just above 5/pool: nothing fires. z_set = z_trigger: only token 2 is in the set.
    _, quiet = run_scripted(f"outlier-trim:z_trigger={5 / POOL + 1e-3},z_set=5", registry)
    assert column(quiet.trace, "triggered", 0) == [False] * 5
    assert column(quiet.trace, "unstable_size", 0) == [0, 0, 0, 2, 0]  # measured, not pruned
    assert column(quiet.trace, "pruned_positions", 0) == [[]] * 5
    _, narrow = run_scripted("outlier-trim:z_trigger=10,z_set=10", registry)
    assert column(narrow.trace, "pruned_positions", 0) == [[], [], [], [2], []]


def test_retries_zero_detects_without_pruning_and_warmup_delays(registry):
    _, result = run_scripted("outlier-trim:z_trigger=10,z_set=5,retries=0", registry)
    assert result.trace[3]["triggered"] == [True, False] and result.trace[3]["pruned_positions"] == [[], []]
    assert result.trace[3]["retries_per_sample"] == [0, 0]
    _, late = run_scripted("outlier-trim:z_trigger=10,z_set=5,warmup=4", registry)
    assert column(late.trace, "threshold", 0) == [None, None, None, None, 10.0]
    assert column(late.trace, "triggered", 0) == [False] * 5


def test_batched_equals_alone_on_the_scripted_model(registry):
    _, both = run_scripted("outlier-trim:z_trigger=10,z_set=5", registry)
    _, alone = run_scripted("outlier-trim:z_trigger=10,z_set=5", registry, batch=1)
    for key in ("severity", "triggered", "unstable_size", "pruned_positions"):
        assert column(both.trace, key, 0) == column(alone.trace, key, 0)
    assert torch.equal(both.latents[:1], alone.latents)


# --------------------------------------------------------------------------------------------------
# tiny-wan with a real latent fault
# --------------------------------------------------------------------------------------------------

TINY_SAMPLER = Sampler(denoising_steps=(1000, 500))


def tiny_run(spec: str, registry, seeds: list[int]):
    adapter = load_tiny_wan(0, latent_size=(8, 8), num_layers=1)
    config = RolloutConfig(num_chunks=6, prompts=[f"scene {s}" for s in seeds], seeds=seeds, sampler=TINY_SAMPLER)
    session = Session(adapter, build_policies(spec, registry.policies), config)
    return session, session.run()


FAULT = "fault:chunk=3,rows=1-2,cols=1-2,target=latent,scale=10"


def test_a_latent_fault_is_pruned_from_its_own_chunk_only(registry):
    session, result = tiny_run(f"outlier-trim+{FAULT}", registry, [0, 1])
    faulted = set(result.trace[3]["faulted_positions"][0])  # tokens 5, 6, 9, 10 of the 4x4 grid
    assert faulted == {5, 6, 9, 10}
    view = session.cache.view()
    for b in range(2):
        assert result.trace[4]["triggered"][b] is True
        pruned = set(result.trace[4]["pruned_positions"][b])
        assert pruned == faulted  # the adaptive set is the fault, all of it
        resident = {(int(c), int(s)) for c, s, v in zip(view.chunk[b], view.spatial_index[b], view.valid[b]) if v}
        # gone from chunk 3 (3 frames x 4 positions), still there in chunks 0-2
        assert not any(c == 3 and s in faulted for c, s in resident)
        assert all((c, s) in resident for c in range(3) for s in faulted)
    assert list(result.trace[4]["dropped_tokens"].values()) == [2 * 3 * 4]
    # the same samples run alone decide and generate the same
    _, alone = tiny_run(f"outlier-trim+{FAULT}", registry, [1])
    assert [r["pruned_positions"][1] for r in result.trace] == [r["pruned_positions"][0] for r in alone.trace]
    assert torch.allclose(result.latents[1:], alone.latents, atol=1e-5)


def test_placed_fault_of_the_study_equals_the_fault_policy(registry):
    spec = importlib.util.spec_from_file_location("fault_study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    _, reference = tiny_run(FAULT, registry, [0, 1])
    placed = study.PlacedFault(chunk=3, target="latent", scale=10.0, per_sample=[(5, 6, 9, 10)] * 2)
    adapter = load_tiny_wan(0, latent_size=(8, 8), num_layers=1)
    config = RolloutConfig(num_chunks=6, prompts=["scene 0", "scene 1"], seeds=[0, 1], sampler=TINY_SAMPLER)
    result = Session(adapter, [placed], config).run()
    assert torch.equal(result.latents, reference.latents)
    # the window search: most / least energy, ties to the lower top-left index
    energy = torch.zeros(1, 16)
    energy[0, [10, 11, 14, 15]] = 1.0
    assert study.best_window(energy, 4, 4, 2, most=True) == [(10, 11, 14, 15)]
    assert study.best_window(energy, 4, 4, 2, most=False) == [(0, 1, 4, 5)]


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def test_defaults_and_spec_round_trip(registry):
    (policy,) = build_policies("outlier-trim", registry.policies)
    assert policy.params() == {"z_trigger": 8.0, "z_set": 4.0, "warmup": 2, "retries": 1,
                               "summary_at": "first_step", "prune": "previous"}
    assert build_policies(policy.spec, registry.policies) == [policy]
    assert OutlierTrim() == policy


@pytest.mark.parametrize("spec, message", [
    ("outlier-trim:z_trigger=-1", r"z_trigger=-1.0 is not allowed; it must be a finite number in \[0.0, inf\)"),
    ("outlier-trim:z_set=nan", r"z_set=nan is not allowed"),
    ("outlier-trim:z_trigger=3,z_set=4", r"z_set=4.0 is not allowed with z_trigger=3.0; z_set must be <= z_trigger"),
    ("outlier-trim:prune=every", r"prune='every' is not allowed; choose one of previous, all"),
    ("outlier-trim:summary_at=last", r"summary_at='last' is not allowed; choose one of first_step, final"),
    ("outlier-trim:warmup=-1", r"warmup=-1 is not allowed; it must be an integer >= 0"),
    ("outlier-trim:retries=-1", r"retries=-1 is not allowed; it must be an integer >= 0"),
])
def test_bad_parameters(registry, spec, message):
    with pytest.raises(ParameterError, match=message):
        build_policies(spec, registry.policies)
