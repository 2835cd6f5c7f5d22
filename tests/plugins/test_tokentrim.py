"""TokenTrim: the paper's equations by hand, the policy through the real engine, the oracle, batching,
composition and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from cachepolicy.cache import CacheView
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import ParameterError
from cachepolicy.models import Sampler
from cachepolicy.plugins.tokentrim import (
    TokenTrim,
    latent_summary,
    prune_mask,
    severity,
    token_drift,
    trigger_threshold,
    triggers,
    unstable_count,
    unstable_set,
)
from cachepolicy.policy import build_policies
from tests import oracle
from tests.oracle import check_rollout_against_full_forward
from tests.plugins.scripted import ScriptedAdapter

TOLERANCE = 1e-5


# --------------------------------------------------------------------------------------------------
# The equations, by hand
# --------------------------------------------------------------------------------------------------


def test_latent_summary_is_the_mean_over_frames():
    # B=1, F=2, N=3, D=2
    grid = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
                          [[3.0, 0.0], [3.0, 0.0], [-5.0, 2.0]]]])
    assert torch.equal(latent_summary(grid), torch.tensor([[[2.0, 1.0], [3.0, 2.0], [0.0, 4.0]]]))


def test_token_drift_is_l2_per_token():
    z = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]]])
    prev = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, -1.0]]])
    assert torch.equal(token_drift(z, prev), torch.tensor([[5.0, 0.0, 2.0]]))


@pytest.mark.parametrize("p, n, k", [
    (0.1, 16, 2),       # ceil(1.6)
    (0.1, 1560, 156),   # Wan2.1 at 480x832
    (0.07, 100, 7),     # 0.07 * 100 == 7.000000000000001 in floating point: still 7
    (0.5, 3, 2),        # ceil(1.5)
    (1e-6, 10, 1),      # never empty
    (0.999, 4, 4),
])
def test_unstable_count_is_ceil_p_n(p, n, k):
    assert unstable_count(p, n) == k


def test_unstable_set_largest_drift_and_ties_to_the_lower_index():
    drift = torch.tensor([[1.0, 5.0, 5.0, 2.0, 5.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert unstable_set(drift, 0.4).tolist() == [[1, 2], [0, 1]]      # k = 2: ties of 5 -> indices 1, 2
    assert unstable_set(drift, 0.6).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert unstable_set(drift, 0.8).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]


def test_severity_is_the_mean_drift_over_the_set():
    drift = torch.tensor([[1.0, 5.0, 4.0, 2.0, 0.5]])
    unstable = unstable_set(drift, 0.4)  # {1, 2}
    assert severity(drift, unstable).tolist() == [4.5]


def test_threshold_mean_plus_lambda_population_std():
    assert trigger_threshold([], 2.0) is None
    assert trigger_threshold([2.0], 2.0) is None       # one severity: no spread, no trigger yet
    assert trigger_threshold([1.0, 3.0], 2.0) == 4.0   # mu 2, sigma 1 (population)
    assert trigger_threshold([1.0, 3.0], 0.0) == 2.0
    # mu 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert trigger_threshold([1.0, 2.0, 3.0, 4.0], 1.0) == pytest.approx(2.5 + math.sqrt(1.25), abs=1e-12)


def test_trigger_is_strict():
    assert not triggers(4.0, 4.0)
    assert triggers(4.000001, 4.0)
    assert not triggers(3.9, 4.0)
    assert not triggers(100.0, None)
    assert not triggers(None, 1.0)


def test_prune_mask_hits_every_frame_at_the_unstable_positions_of_listed_samples():
    # 2x2 token grid (N = 4), two frames resident for sample 0, one frame for sample 1 (padded)
    frame = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    spatial = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 0, 0, 0, 0]])
    valid = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    view = CacheView(frame=frame, chunk=frame, row=spatial // 2, col=spatial % 2, rope_pos=frame,
                     pinned=torch.zeros_like(valid), valid=valid, token_cols=2)
    unstable = torch.tensor([[1, 2], [0, 3]])
    both = prune_mask(view, unstable, torch.tensor([True, True]), 4)
    assert both.tolist() == [[False, True, True, False, False, True, True, False],
                             [True, False, False, True, False, False, False, False]]
    only_first = prune_mask(view, unstable, torch.tensor([True, False]), 4)
    assert only_first[1].any().item() is False and torch.equal(only_first[0], both[0])


# --------------------------------------------------------------------------------------------------
# The policy through the real engine on a scripted model (every number by hand)
# --------------------------------------------------------------------------------------------------

# x0 per (sample, chunk); one frame per chunk, N = 4 tokens with D = 1; p = 0.25 -> one unstable token.
SCRIPT = {
    0: [[0, 0, 0, 0], [1, 0, 0, 0], [1, 2, 0, 0], [1, 2, 0, 1.9], [1, 2, 5, 1.9], [1, 2, 2.5, 2.9]],
    1: [[0, 0, 0, 0], [0, 3, 0, 0], [0, 3, 0, 1], [0, 3, 1, 1], [0, 3, 1, 1.5], [0, 3, 1, 2]],
}
HEALED = [1, 2, 2.5, 1.9]  # sample 0, chunk 4, once spatial token 2 was pruned from the cache


def script(sample: int, chunk: int, pruned: bool) -> list[float]:
    if sample == 0 and chunk == 4 and pruned:
        return HEALED
    return SCRIPT[sample][chunk]


def run_scripted(spec: str, registry, chunks: int = 6, batch: int = 2):
    adapter = ScriptedAdapter(script, 4)
    policies = build_policies(spec, registry.policies)
    session = Session(adapter, policies, RolloutConfig(num_chunks=chunks, prompts=["x"] * batch,
                                                       seeds=list(range(batch))))
    return session.run()


def column(trace, key, sample):
    return [record[key][sample] for record in trace]


def approx_list(values):
    return [None if v is None else pytest.approx(v, abs=TOLERANCE) for v in values]


def test_hand_computed_rollout(registry):
    result = run_scripted("tokentrim:p=0.25,lambda=1", registry)
    trace = result.trace
    # sample 0: severities 1, 2, 1.9 (chunk 3 stays under 1.5 + 1 * 0.5 = 2.0), chunk 4 drifts by 5 at
    # token 2 > 1.6333 + 0.4497; after pruning token 2 it still drifts by 2.5 and is accepted as is.
    mu = (1 + 2 + 1.9) / 3
    sigma4 = math.sqrt(((1 - mu) ** 2 + (2 - mu) ** 2 + (1.9 - mu) ** 2) / 3)
    assert column(trace, "severity", 0) == approx_list([None, 1, 2, 1.9, 2.5, 1.0])
    assert column(trace, "threshold", 0) == approx_list([None, None, None, 2.0, mu + sigma4,
                                                         1.85 + math.sqrt(0.2925)])
    assert column(trace, "triggered", 0) == [False, False, False, False, True, False]
    assert column(trace, "pruned_positions", 0) == [[], [], [], [], [2], []]
    assert column(trace, "tokentrim_retries", 0) == [0, 0, 0, 0, 1, 0]
    assert trace[4]["severity_attempts"][0] == approx_list([5.0, 2.5])
    # sample 1 never triggers; it is only recomputed during sample 0's retry and not re-decided
    assert column(trace, "severity", 1) == approx_list([None, 3, 1, 1, 0.5, 0.5])
    assert column(trace, "threshold", 1) == approx_list([None, None, None, 3.0, 5 / 3 + math.sqrt(8 / 9),
                                                         1.375 + math.sqrt(0.921875)])
    assert column(trace, "triggered", 1) == [False] * 6
    assert trace[4]["severity_attempts"][1] == approx_list([0.5])
    # the engine's view: one restart of sample 0 at chunk 4, 4 tokens (spatial 2 of chunks 0-3) removed
    assert [r["retries_per_sample"] for r in trace][4] == [1, 0]
    assert trace[4]["dropped_tokens"] == {"tokentrim:p=0.25,lambda=1.0,warmup=2,retries=1,summary_at=first_step": 4}
    assert column(trace, "cache_tokens_per_sample", 0) == [4, 8, 12, 16, 16, 20]
    assert column(trace, "cache_tokens_per_sample", 1) == [4, 8, 12, 16, 20, 24]
    # the accepted (healed) latent is what was committed
    assert result.latents[0, 0, 4, 0].tolist() == pytest.approx(HEALED, abs=TOLERANCE)


def test_warmup_boundary(registry):
    # lambda = 0: the threshold is the mean. Sample 0's chunk 3 (1.9 > 1.5) would trigger but is in warm-up.
    trace = run_scripted("tokentrim:p=0.25,lambda=0,warmup=4", registry).trace
    assert column(trace, "threshold", 0) == approx_list([None, None, None, None, 4.9 / 3, (1 + 2 + 1.9 + 2.5) / 4])
    assert column(trace, "triggered", 0) == [False, False, False, False, True, False]
    # warmup=3: chunk 3 is the first that may trigger, and does
    trace = run_scripted("tokentrim:p=0.25,lambda=0,warmup=3", registry).trace
    assert column(trace, "threshold", 0)[3] == pytest.approx(1.5, abs=TOLERANCE)
    assert column(trace, "triggered", 0)[:4] == [False, False, False, True]


def test_no_trigger_before_two_severities_even_without_warmup(registry):
    # chunk 0 has no predecessor; at chunk 2 only chunk 1's severity exists (2 > 1 would fire with sigma 0)
    trace = run_scripted("tokentrim:p=0.25,lambda=0,warmup=0", registry).trace
    assert column(trace, "threshold", 0)[:3] == [None, None, None]
    assert column(trace, "triggered", 0)[:3] == [False, False, False]
    assert column(trace, "threshold", 0)[3] == pytest.approx(1.5, abs=TOLERANCE)


def test_retries_zero_detects_without_pruning(registry):
    trace = run_scripted("tokentrim:p=0.25,lambda=1,retries=0", registry).trace
    assert trace[4]["triggered"] == [True, False]
    assert trace[4]["pruned_positions"] == [[], []]
    assert trace[4]["tokentrim_retries"] == [0, 0] and trace[4]["retries_per_sample"] == [0, 0]
    assert trace[4]["severity"][0] == pytest.approx(5.0, abs=TOLERANCE)  # the unpruned chunk is accepted


def test_retries_are_bounded(registry):
    # retries=2: the healed attempt (2.5) still triggers, prunes token 2 again (nothing left) and retries once
    # more; the third attempt is accepted as is
    trace = run_scripted("tokentrim:p=0.25,lambda=1,retries=2", registry).trace
    assert trace[4]["tokentrim_retries"] == [2, 0] and trace[4]["retries_per_sample"] == [2, 0]
    assert trace[4]["severity_attempts"][0] == approx_list([5.0, 2.5, 2.5])
    assert trace[4]["pruned_positions"] == [[2], []]


def test_summary_at_final_decides_on_the_candidate(registry):
    first = run_scripted("tokentrim:p=0.25,lambda=1", registry).trace
    final = run_scripted("tokentrim:p=0.25,lambda=1,summary_at=final", registry).trace
    for key in ("triggered", "pruned_positions", "tokentrim_retries"):
        assert [r[key] for r in final] == [r[key] for r in first]


# x0 per chunk and denoising step of a 3-step sampler (1000, 750, 500; sigma t / 1000), one sample, N = 4, D = 1.
# The final x0 is [c, 0, 0, 0]: every final drift is 1 at token 0 (sigma of the history 0, no trigger ever).
# The first step predicts [c + 0.5, 0, 0, 0] (drift 1.5 against the committed previous chunk), except chunk 3,
# whose first step shows a jump of 6 at token 2 until token 2 is pruned. The middle step predicts [c + 20, ...]:
# a summary read there would give severities near 20.
def multi_step_script(sample: int, chunk: int, pruned: bool, step: int) -> list[float]:
    if step == 2:
        return [chunk, 0, 0, 0]
    if step == 1:
        return [chunk + 20, 0, 0, 0]
    return [chunk + 0.5, 0, 6 if chunk == 3 and not pruned else 0, 0]


def run_multi_step(spec: str, registry) -> tuple[list[dict], ScriptedAdapter]:
    adapter = ScriptedAdapter(multi_step_script, 4, steps=(1000, 750, 500))
    session = Session(adapter, build_policies(spec, registry.policies),
                      RolloutConfig(num_chunks=6, prompts=["x"], seeds=[0]))
    return session.run().trace, adapter


def test_summary_at_modes_read_different_steps_of_a_multi_step_sampler(registry):
    """``first_step`` reads the x0 after step 0, ``final`` the x0 after the last step (never the middle one),
    each against the committed previous chunk: the two modes give different severities and decisions."""
    first, first_adapter = run_multi_step("tokentrim:p=0.25,lambda=1", registry)
    final, _ = run_multi_step("tokentrim:p=0.25,lambda=1,summary_at=final", registry)
    # first_step: |c + 0.5 - (c - 1)| = 1.5 every chunk; chunk 3's first attempt drifts by 6 at token 2 and
    # triggers (6 > 1.5 + 1 * 0); its retry, with token 2 pruned, is accepted at 1.5 (not > 1.5)
    assert column(first, "severity", 0) == approx_list([None, 1.5, 1.5, 1.5, 1.5, 1.5])
    assert first[3]["severity_attempts"][0] == approx_list([6.0, 1.5])
    assert column(first, "threshold", 0) == approx_list([None, None, None, 1.5, 1.5, 1.5])
    assert column(first, "triggered", 0) == [False, False, False, True, False, False]
    assert column(first, "pruned_positions", 0) == [[], [], [], [2], [], []]
    # final: |c - (c - 1)| = 1 every chunk, no trigger (the jump never reaches the final x0)
    assert column(final, "severity", 0) == approx_list([None, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert column(final, "triggered", 0) == [False] * 6 and column(final, "tokentrim_retries", 0) == [0] * 6
    # the retry restarted chunk 3 after its first forward: 1 + 3 denoising forwards and the context pass
    assert [(t, commit) for c, t, commit in first_adapter.calls if c == 3] == [
        (1000.0, False), (1000.0, False), (750.0, False), (500.0, False), (0.0, True)]


# F = 2 frames, D = 2 channels, N = 3 tokens: the chunk's summary Z (the frame mean) per chunk, with frames
# Z + (c + 1) d and Z - (c + 1) d, so that only the mean over frames gives these drifts, and (3, 4) steps of
# length 5 so that only the L2 norm over the two channels does.
SUMMARIES = [
    [[0, 0], [0, 0], [0, 0]],
    [[3, 4], [0, 0], [0, 0]],      # token 0 drifts by 5
    [[3, 4], [6, 8], [0, 0]],      # token 1 drifts by 10
    [[3, 4], [6, 8], [9, 12]],     # token 2 drifts by 15: triggers
    [[3, 4], [6, 8], [0.6, 0.8]],  # no drift
]
HEALED_SUMMARY = [[3, 4], [6, 8], [0.6, 0.8]]  # chunk 3 once token 2 is pruned: drift 1 at token 2
FRAME_OFFSET = [[1, -2], [5, 5], [-3, 7]]


def frames_script(sample: int, chunk: int, pruned: bool) -> list:
    summary = HEALED_SUMMARY if chunk == 3 and pruned else SUMMARIES[chunk]
    # nested [C][F][N]
    scale = chunk + 1  # the frames' spread changes from chunk to chunk; only the frame mean is stable
    return [[[summary[n][c] + sign * scale * FRAME_OFFSET[n][c] for n in range(3)] for sign in (1, -1)]
            for c in range(2)]


def test_tokentrim_with_several_frames_and_channels_by_hand(registry):
    adapter = ScriptedAdapter(frames_script, 3, frames=2, channels=2)
    session = Session(adapter, build_policies("tokentrim:p=0.3,lambda=1", registry.policies),
                      RolloutConfig(num_chunks=5, prompts=["x"], seeds=[0]))
    result = session.run()
    trace = result.trace
    assert result.latents.shape == (1, 2, 10, 1, 3)  # [B, C, F * chunks, H, W]
    assert column(trace, "severity", 0) == approx_list([None, 5.0, 10.0, 1.0, 0.0])
    assert trace[3]["severity_attempts"][0] == approx_list([15.0, 1.0])
    mu = 16 / 3  # history [5, 10, 1] at chunk 4
    sigma = math.sqrt(((5 - mu) ** 2 + (10 - mu) ** 2 + (1 - mu) ** 2) / 3)
    assert column(trace, "threshold", 0) == approx_list([None, None, None, 7.5 + 2.5, mu + sigma])
    assert column(trace, "triggered", 0) == [False, False, False, True, False]
    assert column(trace, "pruned_positions", 0) == [[], [], [], [2], []]
    # spatial token 2 of the 6 cached frames (chunks 0-2, 2 frames each) was removed from the cache
    assert list(trace[3]["dropped_tokens"].values()) == [6]
    assert column(trace, "cache_tokens_per_sample", 0) == [6, 12, 18, 18, 24]
    view = session.cache.view()
    resident = {(int(f), int(s)) for f, s, v in zip(view.frame[0], view.spatial_index[0], view.valid[0]) if v}
    assert not any(s == 2 and f < 6 for f, s in resident) and (6, 2) in resident and (0, 0) in resident


def test_lambda_spec_name_round_trips(registry):
    (policy,) = build_policies("tokentrim:lambda=1.5,p=0.2", registry.policies)
    assert policy.lam == 1.5 and policy.p == 0.2
    assert policy.params() == {"p": 0.2, "lambda": 1.5, "warmup": 2, "retries": 1, "summary_at": "first_step"}
    assert policy.spec == "tokentrim:p=0.2,lambda=1.5,warmup=2,retries=1,summary_at=first_step"
    assert build_policies(policy.spec, registry.policies) == [policy]
    assert TokenTrim(lam=1.5, p=0.2) == policy
    with pytest.raises(ParameterError, match=r"no parameter 'lam'; its parameters are: p \(float\), lambda \(float\)"):
        build_policies("tokentrim:lam=1", registry.policies)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("tokentrim:p=0", r"p=0.0 is not allowed; it must be a finite number in \(0.0, 1.0\)"),
    ("tokentrim:p=1", r"p=1.0 is not allowed"),
    ("tokentrim:p=1.5", r"p=1.5 is not allowed"),
    ("tokentrim:p=-0.1", r"p=-0.1 is not allowed"),
    ("tokentrim:p=nan", r"p=nan is not allowed"),
    ("tokentrim:lambda=-1", r"lambda=-1.0 is not allowed; it must be a finite number in \[0.0, inf\)"),
    ("tokentrim:warmup=-1", r"warmup=-1 is not allowed; it must be an integer >= 0"),
    ("tokentrim:retries=-2", r"retries=-2 is not allowed; it must be an integer >= 0"),
    ("tokentrim:summary_at=last", r"summary_at='last' is not allowed; choose one of first_step, final"),
])
def test_bad_parameters(registry, spec, message):
    with pytest.raises(ParameterError, match=message):
        build_policies(spec, registry.policies)


def test_python_api_validates_too():
    with pytest.raises(ParameterError, match="lambda=-0.5 is not allowed"):
        TokenTrim(lam=-0.5)
    with pytest.raises(ParameterError, match="summary_at='x' is not allowed"):
        TokenTrim(summary_at="x")


def test_adapter_without_token_grid_is_refused_before_any_forward(registry):
    calls = []

    def counting(sample, chunk, pruned):
        calls.append(chunk)
        return [0, 0, 0, 0]

    adapter = ScriptedAdapter(counting, 4, grid=False)
    session = Session(adapter, build_policies("tokentrim", registry.policies),
                      RolloutConfig(num_chunks=2, prompts=["x"], seeds=[0]))
    with pytest.raises(ParameterError, match="adapter 'scripted' provides no token-grid mapping"):
        session.run()
    assert calls == []


def test_adapter_with_a_wrong_token_grid_is_refused(registry):
    class Wrong(ScriptedAdapter):
        def token_grid(self, latent):
            return latent.reshape(latent.shape[0], 1, -1)  # [B, 1, F*N*C]: not [B, F, N, D]

    session = Session(Wrong(script, 4), build_policies("tokentrim", registry.policies),
                      RolloutConfig(num_chunks=2, prompts=["x"], seeds=[0]))
    with pytest.raises(ParameterError, match=r"expected \[1, 1, 4, D\]"):
        session.run()


# --------------------------------------------------------------------------------------------------
# tiny-wan: oracle, batching, composition
# --------------------------------------------------------------------------------------------------

FAST = Sampler(denoising_steps=(1000, 750, 500))


def run_recorded(adapter, registry, spec, num_chunks, seeds, prompts=None, sampler=FAST):
    return oracle.run_recorded(adapter, registry, spec, num_chunks, seeds, prompts=prompts, sampler=sampler)


@pytest.mark.parametrize("spec", [
    "tokentrim:lambda=0",
    "tokentrim:lambda=0,summary_at=final,retries=2",
    "tokentrim:p=0.3,lambda=0+attention-sink:frames=3+sliding-window:frames=6",
    "tokentrim+fault:chunk=3,rows=1-2,cols=1-2,scale=8,target=latent",
])
def test_rollouts_that_prune_match_the_full_forward_oracle(tiny_wan, registry, spec):
    adapter = tiny_wan(seed=1)
    result, records, _ = run_recorded(adapter, registry, spec, num_chunks=6, seeds=[0, 1])
    assert sum(sum(r["tokentrim_retries"]) for r in result.trace) >= 1, "the rollout must actually prune"
    # restarted attempts are logged too: more forwards than 6 chunks x 3 steps
    assert len(records["forwards"]) > 6 * 3
    assert check_rollout_against_full_forward(adapter, result, records) <= TOLERANCE


def test_a_fault_makes_tokentrim_trigger_within_two_chunks(tiny_wan, registry):
    adapter = tiny_wan(seed=1, latent_size=(16, 16))
    result, _, _ = run_recorded(adapter, registry, "tokentrim+fault:chunk=4,rows=2-4,cols=2-4,scale=10,target=latent",
                                num_chunks=7, seeds=[0])
    triggered = [r["chunk"] for r in result.trace if r["triggered"][0]]
    assert any(c in (5, 6) for c in triggered), triggered
    faulted = set(result.trace[4]["faulted_positions"][0])
    pruned = set(result.trace[5]["pruned_positions"][0])
    assert len(faulted) == 9 and pruned and pruned <= faulted  # all 7 pruned positions were corrupted


@pytest.mark.parametrize("patch, latent_size", [((1, 2, 2), (8, 12)), ((1, 1, 2), (6, 8))])
def test_token_grid_rows_are_the_models_patch_tokens(tiny_wan, patch, latent_size):
    """B1's layout, checked against the model itself: row ``n`` of frame ``f`` of ``token_grid`` is the patch
    that the transformer's own patch embedding turns into its token ``f * N + n`` (and, linearly, with the
    Conv3d weight's ``(C, p_h, p_w)`` order), which is the cached token of frame ``f`` with spatial index
    ``n``. Non-square token grids, so a row/column swap cannot pass."""
    adapter = tiny_wan(seed=2, latent_size=latent_size, patch_size=patch)
    info, model = adapter.info, adapter.model
    n, frames = info.tokens_per_frame, info.frames_per_chunk
    assert (info.token_rows, info.token_cols) == (latent_size[0] // patch[1], latent_size[1] // patch[2])
    latent = torch.randn(2, info.latent_channels, frames, *latent_size, generator=torch.Generator().manual_seed(0))
    grid = adapter.token_grid(latent)
    assert grid.shape == (2, frames, n, info.latent_channels * patch[1] * patch[2])
    with torch.no_grad():
        tokens = model.patch_embedding(latent).flatten(2).transpose(1, 2)  # diffusers' order: frame, row, col
        weight = model.patch_embedding.weight.reshape(model.patch_embedding.out_channels, -1)
        embedded = grid.reshape(2, frames * n, -1) @ weight.T + model.patch_embedding.bias
    assert (embedded - tokens).abs().max().item() <= 1e-5
    # the cache records the model's token f * N + i as frame f, spatial index i
    cache = adapter.new_cache(2)
    oracle.adapter_forward(adapter, latent, torch.zeros(2, frames), 0, 0, cache, adapter.encode_prompts(["a", "b"]),
                           True)
    view = cache.view()
    assert view.spatial_index[0].tolist() == list(range(n)) * frames
    assert view.frame[0].tolist() == [f for f in range(frames) for _ in range(n)]


TRACE_FIELDS = ("triggered", "pruned_positions", "tokentrim_retries", "retries_per_sample",
                "cache_tokens_per_sample")


def test_batched_run_equals_each_sample_alone(tiny_wan, registry):
    adapter = tiny_wan(seed=4)
    spec = "tokentrim:lambda=0.5+attention-sink:frames=3"
    seeds = [3, 5, 8]
    batched, _, _ = run_recorded(adapter, registry, spec, 7, seeds)
    triggers_per_sample = [sum(r["triggered"][b] for r in batched.trace) for b in range(3)]
    decisions = [[r["triggered"][b] for r in batched.trace] for b in range(3)]
    assert len({tuple(d) for d in decisions}) > 1, "samples must decide differently for the test to mean something"
    assert sum(triggers_per_sample) >= 2
    for b, seed in enumerate(seeds):
        alone, _, _ = run_recorded(adapter, registry, spec, 7, [seed], prompts=[f"prompt number {seed}"])
        assert (batched.latents[b:b + 1] - alone.latents).abs().max().item() <= TOLERANCE
        for rec_b, rec_a in zip(batched.trace, alone.trace):
            for key in TRACE_FIELDS:
                assert rec_b[key][b] == rec_a[key][0], (rec_b["chunk"], key)
            for key in ("severity", "threshold"):
                expected = rec_a[key][0]
                assert rec_b[key][b] == (None if expected is None else pytest.approx(expected, abs=TOLERANCE))


def test_sink_tokens_are_never_pruned(tiny_wan, registry):
    adapter = tiny_wan(seed=4)
    tpf = adapter.info.tokens_per_frame
    result, records, _ = run_recorded(adapter, registry, "attention-sink:frames=3+tokentrim:p=0.5,lambda=0",
                                      num_chunks=6, seeds=[0, 1])
    assert sum(sum(r["tokentrim_retries"]) for r in result.trace) >= 3
    # pruning happened, at spatial positions that the sink frames hold too: only the sink kept them
    assert any(r["dropped_tokens"] for r in result.trace)
    sink = set(range(3 * tpf))
    for fwd in records["forwards"]:
        if fwd["chunk"] > 0:
            for resident in fwd["resident"][0][0]:
                assert sink <= set(resident.tolist()), (fwd["chunk"], fwd["attempt"])
    for chunk, resident_sets in records["commits"].items():
        for resident in resident_sets[0][0]:
            if chunk > 0:
                assert sink <= set(resident.tolist()), chunk


def test_window_and_pruning_leave_exactly_the_expected_tokens(tiny_wan, registry):
    adapter = tiny_wan(seed=3)
    info = adapter.info
    tpf, F = info.tokens_per_frame, info.frames_per_chunk
    window = 6
    result, records, session = run_recorded(adapter, registry, f"sliding-window:frames={window}+tokentrim:p=0.25,lambda=0",
                                            num_chunks=7, seeds=[0, 1])
    assert sum(sum(r["tokentrim_retries"]) for r in result.trace) >= 2
    for b in range(2):
        expected: set[tuple[int, int]] = set()  # (frame, spatial)
        for record in result.trace:
            c = record["chunk"]
            pruned = set(record["pruned_positions"][b])
            expected = {(f, s) for f, s in expected if s not in pruned}           # TokenTrim, before commit
            got = {(int(i) // tpf, int(i) % tpf) for i in records["commits"][c][0][0][b]}
            assert got == expected, (b, c)
            expected |= {(f, s) for f in range(c * F, (c + 1) * F) for s in range(tpf)}  # commit
            newest = (c + 1) * F - 1
            expected = {(f, s) for f, s in expected if f > newest - window}      # the window
            assert record["cache_tokens_per_sample"][b] == len(expected)
        view = session.cache.view()
        final = {(int(f), int(s)) for f, s, v in zip(view.frame[b], view.spatial_index[b], view.valid[b]) if v}
        assert final == expected


def test_first_step_summaries_are_refused_under_a_rolling_window(registry):
    """Under Rolling Forcing's window a block's first step never reaches after_step: first_step would silently
    never trigger, so it is refused before any forward; final works."""
    from cachepolicy.adapters.wan.tiny import load_tiny_wan
    from cachepolicy.recipes import get_recipe, merge_policy_specs

    recipe = get_recipe("rolling-forcing")
    for summary_at, refused in (("first_step", True), ("final", False)):
        specs = merge_policy_specs(recipe, [f"tokentrim:p=0.2,lambda=0,summary_at={summary_at}"])
        session = Session(load_tiny_wan(seed=3), build_policies(specs, registry.policies),
                          RolloutConfig(num_chunks=3, prompts=["a"], seeds=[0], recipe=recipe))
        if refused:
            with pytest.raises(ParameterError, match="summary_at=first_step cannot work under recipe "
                                                     "'rolling-forcing'.*use summary_at=final"):
                session.run()
            assert session.trace == [] and session.latents == []
        else:
            assert len(session.run().trace) == 3
