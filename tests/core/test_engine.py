"""The rollout engine: restarts with bounded retries, determinism, batching, order-independence, failures."""

from __future__ import annotations

import itertools
import json
from typing import ClassVar

import attrs
import pytest
import torch

from cachepolicy.api import run_to_dir
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import CompositionError, NonFiniteOutputError, RolloutConfigError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import Policy, PruneRequest, Selection, build_policies
from tests.oracle import Recorder, adapter_forward, check_rollout_against_full_forward


@attrs.frozen
class PruneFirstFrame(Policy):
    """Test policy: at chunk ``at``, after denoising step 0, prune every cached token of frame 0 and restart.

    It asks on every attempt; the engine must stop after ``bound`` restarts.
    """

    name: ClassVar[str] = "prune-first-frame"
    at: int = 2
    bound: int = 1

    def new_state(self):
        return {"asked": 0}

    @hookimpl
    def cachepolicy_after_step(self, session, step):
        if step.chunk != self.at or step.step != 0:
            return None
        self.state(session)["asked"] += 1
        return PruneRequest(drop=step.view.valid & (step.view.frame == 0),
                            samples=torch.ones(step.view.batch_size, dtype=torch.bool),
                            max_restarts=self.bound, reason="test")


@attrs.frozen
class DropOddRows(Policy):
    """Test policy: drops every resident token on an odd token row (an arbitrary third opinion)."""

    name: ClassVar[str] = "drop-odd-rows"

    @hookimpl
    def cachepolicy_select(self, session, view):
        return Selection(drop=view.valid & (view.row % 2 == 1))


def run(adapter, policies, chunks=5, prompts=("a", "b"), seeds=(0, 1), **kwargs):
    config = RolloutConfig(num_chunks=chunks, prompts=prompts, seeds=seeds, **kwargs)
    session = Session(adapter, policies, config)
    return session, session.run()


@pytest.mark.parametrize("bound", [0, 1, 2])
def test_restart_prunes_and_respects_the_policys_bound(tiny_wan, bound):
    adapter = tiny_wan(seed=4)
    policy, recorder = PruneFirstFrame(at=2, bound=bound), Recorder()
    session, result = run(adapter, [policy, recorder])
    trace = result.trace
    assert trace[2]["retries"] == bound
    assert session.policy_state[policy.spec]["asked"] == bound + 1
    tpf = adapter.info.tokens_per_frame
    pruned = trace[2]["dropped_tokens"].get(policy.spec, 0)
    assert pruned == (2 * tpf if bound else 0)  # frame 0 of both samples, pruned once (then gone)
    assert all(r["retries"] == 0 for i, r in enumerate(trace) if i != 2)
    # the pruned frame is gone for good: later chunks hold 15 frames minus frame 0
    assert trace[-1]["cache_tokens"] == (15 - (1 if bound else 0)) * tpf
    forwards = session.policy_state[recorder.spec]["forwards"]
    assert len(forwards) == 5 * 4 + bound  # each restart after step 0 costs one extra forward
    assert check_rollout_against_full_forward(adapter, result, session.policy_state[recorder.spec]) <= 1e-5


def test_restart_reuses_the_same_noise(tiny_wan):
    adapter = tiny_wan(seed=4)
    recorder = Recorder()
    session, _ = run(adapter, [PruneFirstFrame(at=1, bound=1), recorder], chunks=2)
    attempts = [f for f in session.policy_state[recorder.spec]["forwards"] if f["chunk"] == 1 and f["step"] == 0]
    assert len(attempts) == 2 and torch.equal(attempts[0]["x_t"], attempts[1]["x_t"])


def test_same_seed_same_bits(tiny_wan, registry):
    policies = build_policies("attention-sink:frames=3+sliding-window:frames=3", registry.policies)
    _, first = run(tiny_wan(seed=5), policies)
    _, second = run(tiny_wan(seed=5), policies)
    assert torch.equal(first.latents, second.latents)
    _, other = run(tiny_wan(seed=5), policies, seeds=(2, 3))
    assert not torch.allclose(first.latents, other.latents)


def test_batched_run_equals_each_sample_alone(tiny_wan, registry):
    policies = build_policies("attention-sink:frames=3+sliding-window:frames=6", registry.policies)
    _, batched = run(tiny_wan(seed=6), policies, prompts=("one prompt", "another prompt"), seeds=(10, 11))
    for b, (prompt, seed) in enumerate([("one prompt", 10), ("another prompt", 11)]):
        _, alone = run(tiny_wan(seed=6), policies, prompts=(prompt,), seeds=(seed,))
        assert torch.allclose(batched.latents[b:b + 1], alone.latents, atol=1e-5, rtol=0)


def test_composition_order_does_not_matter(tiny_wan, registry):
    base = build_policies("attention-sink:frames=2+sliding-window:frames=4", registry.policies) + [DropOddRows()]
    results = []
    for order in itertools.permutations(base):
        _, result = run(tiny_wan(seed=7), list(order), chunks=4)
        results.append(result)
    for other in results[1:]:
        assert torch.equal(other.latents, results[0].latents)
        assert [r["cache_tokens_per_sample"] for r in other.trace] == \
               [r["cache_tokens_per_sample"] for r in results[0].trace]
        assert [r["dropped_tokens"] for r in other.trace] == [r["dropped_tokens"] for r in results[0].trace]


def test_protect_beats_drop_in_a_rollout(tiny_wan, registry):
    """Odd rows are dropped everywhere except in the sink frames."""
    sink = build_policies("attention-sink:frames=3", registry.policies)
    session, result = run(tiny_wan(seed=7), [*sink, DropOddRows()], chunks=3)
    view = session.cache.view()
    odd = view.valid & (view.row % 2 == 1)
    assert bool(odd.any()) and bool((view.frame[odd] < 3).all())
    assert bool(view.pinned[view.valid & (view.frame < 3)].all())


class NaNAfter:
    """Wraps an adapter so that the model output turns NaN from chunk ``at`` on."""

    def __init__(self, adapter, at):
        self._adapter, self.at = adapter, at

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def forward(self, latent, timesteps, call, cache, conditioning):
        out = self._adapter.forward(latent, timesteps, call, cache, conditioning)
        return out * float("nan") if call.chunk >= self.at else out


def test_non_finite_output_stops_names_the_chunk_and_keeps_what_was_written(tiny_wan, tmp_path):
    adapter = NaNAfter(tiny_wan(), at=2)
    with pytest.raises(NonFiniteOutputError, match="non-finite values at chunk 2") as info:
        run_to_dir(adapter, "full", out=tmp_path / "run", num_chunks=5)
    assert info.value.chunk == 2
    from cachepolicy.outputs import read_run

    latents, run_json, trace = read_run(tmp_path / "run")
    assert run_json["status"] == "failed" and "chunk 2" in run_json["error"]
    assert [r["chunk"] for r in trace] == [0, 1]
    assert latents.shape[2] == 2 * 3 and bool(torch.isfinite(latents).all())


def test_rollout_past_the_rope_table_is_refused_before_it_starts(tiny_wan):
    adapter = tiny_wan(rope_max_seq_len=10)
    session = Session(adapter, [], RolloutConfig(num_chunks=4, prompts=["x"], seeds=[0]))
    with pytest.raises(RolloutConfigError, match="12 latent frames .* passes the model's rope_max_seq_len=10.*at most 3 chunks"):
        session.run()
    assert session.trace == []


def test_batch_must_match(tiny_wan):
    with pytest.raises(RolloutConfigError, match="2 seeds for 1 prompts"):
        RolloutConfig(num_chunks=1, prompts=["a"], seeds=[0, 1])
    adapter = tiny_wan()
    cache = adapter.new_cache(2)
    conditioning = adapter.encode_prompts(["a"])
    from cachepolicy.errors import CacheShapeError

    with pytest.raises(CacheShapeError, match="a batch of 1 samples does not match the cache's batch of 2"):
        adapter_forward(adapter, torch.zeros(1, 4, 3, 8, 8), torch.zeros(1, 3), 0, 0, cache, conditioning, False)


@attrs.frozen
class RewriteLatent(Policy):
    name: ClassVar[str] = "rewrite"
    tag: int = 0

    @hookimpl
    def cachepolicy_before_commit(self, session, candidate):
        return candidate.x0 * 0


@attrs.frozen
class RewriteLatentToo(RewriteLatent):
    name: ClassVar[str] = "rewrite-too"


def test_two_latent_rewrites_are_refused(tiny_wan):
    with pytest.raises(CompositionError, match="all rewrite the latent of chunk 0"):
        run(tiny_wan(), [RewriteLatent(), RewriteLatentToo()], chunks=1)


def test_trace_is_json_and_complete(tiny_wan, registry, tmp_path):
    paths = run_to_dir(tiny_wan(), "attention-sink:frames=3+sliding-window:frames=3", out=tmp_path / "r",
                       num_chunks=4, batch=2)
    records = [json.loads(line) for line in paths["trace"].read_text().splitlines()]
    tpf = 16
    assert [r["cache_tokens"] for r in records] == [3 * tpf, 6 * tpf, 6 * tpf, 6 * tpf]
    assert [r["dropped_tokens"]["sliding-window:frames=3"] for r in records] == [0, 0, 2 * 3 * tpf, 2 * 3 * tpf]
    for r in records:
        assert {"chunk", "cache_tokens", "dropped_tokens", "retries", "seconds"} <= set(r)
        assert r["seconds"] >= r["forward_seconds"] > 0


@attrs.frozen
class Misspelt(Policy):
    name: ClassVar[str] = "misspelt"

    @hookimpl
    def cachepolicy_selcet(self, session, view):  # typo on purpose
        return None


def test_a_misspelt_hook_is_an_error_not_a_silent_no_op(tiny_wan):
    from cachepolicy.errors import PluginLoadError

    with pytest.raises(PluginLoadError, match="policy .*misspelt.* does not fit the rollout hooks.*cachepolicy_selcet"):
        Session(tiny_wan(), [Misspelt()], RolloutConfig(num_chunks=1, prompts=["x"], seeds=[0]))


def test_predicted_noise_sampler_takes_euler_steps(tiny_wan):
    """``noise=predicted``: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i exactly, and x0 = x - sigma * v."""
    from cachepolicy.models import Sampler

    sampler = Sampler(denoising_steps=(1000, 750, 500, 250), warp=False, noise="predicted")
    recorder = Recorder()
    session, _ = run(tiny_wan(seed=9), [recorder], chunks=2, sampler=sampler)
    forwards = session.policy_state[recorder.spec]["forwards"]
    sigmas = sampler.sigmas()
    assert sigmas == [1.0, 0.75, 0.5, 0.25]
    for chunk in range(2):
        steps = [f for f in forwards if f["chunk"] == chunk]
        for i in range(3):
            x, v, x_next = steps[i]["x_t"].double(), steps[i]["output"].double(), steps[i + 1]["x_t"].double()
            assert torch.allclose(x_next, x + (sigmas[i + 1] - sigmas[i]) * v, atol=1e-6, rtol=0)


def test_fresh_and_predicted_noise_differ_only_after_the_first_step(tiny_wan):
    from cachepolicy.models import Sampler

    fresh, predicted = Recorder(), Recorder()
    s1, _ = run(tiny_wan(seed=9), [fresh], chunks=1, sampler=Sampler(noise="fresh"))
    s2, _ = run(tiny_wan(seed=9), [predicted], chunks=1, sampler=Sampler(noise="predicted"))
    a, b = s1.policy_state[fresh.spec]["forwards"], s2.policy_state[predicted.spec]["forwards"]
    assert torch.equal(a[0]["x_t"], b[0]["x_t"]) and not torch.allclose(a[1]["x_t"], b[1]["x_t"])


@pytest.mark.parametrize("spec", ["", "sliding-window:frames=6", "attention-sink:frames=3+sliding-window:frames=3"])
def test_guided_rollout_matches_guidance_over_two_full_forwards(tiny_wan, registry, spec):
    """Classifier-free guidance: every step equals ``u + w (c - u)`` of two block-causal full forwards
    (prompt / empty prompt) under the keep sets, so the unconditional cache got every commit and keep set."""
    from cachepolicy.models import Sampler
    from tests.oracle import run_recorded

    adapter = tiny_wan(seed=3)
    sampler = Sampler(denoising_steps=(1000, 750, 500), shift=3.0, guidance=3.0)
    result, records, session = run_recorded(adapter, registry, spec, 5, [0, 1], sampler=sampler)
    assert session.cache.branches == 2 and len(session.cache.cells) == 2 * adapter.info.num_layers
    assert check_rollout_against_full_forward(adapter, result, records, guidance=3.0) <= 2e-5
    # the oracle can tell: against unguided full forwards the same outputs are far off
    assert check_rollout_against_full_forward(adapter, result, records) > 1e-2
    assert result.trace[-1]["cache_bytes"] == session.cache.nbytes()


def test_guided_prune_and_restart_prunes_both_branches(tiny_wan):
    """A prune request mid-chunk (restart) removes the tokens from both caches: still the oracle."""
    from cachepolicy.models import Sampler

    adapter, recorder = tiny_wan(seed=5), Recorder()
    sampler = Sampler(denoising_steps=(1000, 750, 500), shift=3.0, guidance=2.5)
    pruner = PruneFirstFrame(at=2, bound=1)
    session, result = run(adapter, [pruner, recorder], chunks=4, sampler=sampler)
    assert result.trace[2]["retries"] == 1 and result.trace[2]["dropped_tokens"][pruner.spec] > 0
    records = session.policy_state[recorder.spec]
    assert check_rollout_against_full_forward(adapter, result, records, guidance=2.5) <= 2e-5


def test_guidance_zero_is_the_empty_prompt_and_one_is_unguided(tiny_wan):
    """``w = 0`` samples the unconditional branch alone: the latents of a rollout whose prompts are empty;
    ``w = 1`` runs one forward per step with a single cache."""
    from cachepolicy.models import Sampler

    steps = dict(denoising_steps=(1000, 500), shift=3.0)
    _, zero = run(tiny_wan(seed=4), [], chunks=3, sampler=Sampler(**steps, guidance=0.0))
    _, empty = run(tiny_wan(seed=4), [], chunks=3, prompts=("", ""), sampler=Sampler(**steps))
    assert torch.allclose(zero.latents, empty.latents, atol=1e-5)
    one, plain = run(tiny_wan(seed=4), [], chunks=3, sampler=Sampler(**steps, guidance=1.0))
    assert one.cache.branches == 1 and len(one.cache.cells) == tiny_wan().info.num_layers
    assert not torch.allclose(plain.latents, empty.latents, atol=1e-3)  # the prompts matter in this model


@pytest.mark.parametrize("guidance", [float("nan"), -1.0, float("inf")])
def test_guidance_must_be_a_finite_non_negative_scale(guidance):
    from cachepolicy.errors import ParameterError
    from cachepolicy.models import Sampler

    with pytest.raises(ParameterError, match=r"sampler guidance must be a finite scale >= 0 \(1 = no guidance\), "
                                             rf"got {guidance!r}"):
        Sampler(guidance=guidance)


@attrs.frozen
class Started(Policy):
    name: ClassVar[str] = "started"

    def new_state(self):
        return []

    @hookimpl
    def cachepolicy_session_start(self, session):
        self.state(session).append("start")


def test_a_recipes_stagger_runs_checked_first_and_sized_for_its_widest_call(registry):
    """A recipe with a Stagger runs its loop (cachepolicy.stagger); Session.check refuses a misfit before any
    hook or forward; the cache is reserved for the stagger's widest call (3 blocks), not for one chunk."""
    from cachepolicy.adapters.skyreels.adapter import load_tiny_skyreels
    from cachepolicy.recipes import Recipe, Stagger

    stagger = Stagger(steps=5, ar_step=2)
    recipe = Recipe(name="staggered", summary="", stagger=stagger, sampler=stagger.sampler(1.0))
    adapter = load_tiny_skyreels(seed=1)
    window = build_policies("sliding-window:frames=3", registry.policies)
    session, result = run(adapter, window, chunks=5, recipe=recipe, prompts=("a",), seeds=(0,))
    blocks = [record["window_blocks"] for record in result.trace]
    assert [record["chunk"] for record in result.trace] == [0, 1, 2, 3, 4]
    assert max(last - first + 1 for first, last in blocks) == stagger.window_blocks(5) == 3
    assert session.cache.reallocations == 0
    policy = Started()
    session = Session(adapter, [policy], RolloutConfig(num_chunks=2, prompts=("a",), seeds=(0,), recipe=recipe,
                                                       sampler=attrs.evolve(recipe.sampler, context_noise=5)))
    with pytest.raises(RolloutConfigError, match="context_noise=5 is not allowed"):
        session.run()
    assert session.policy_state[policy.spec] == [] and session.latents == []


@pytest.mark.parametrize("spec, frames", [("", 15), ("attention-sink:frames=3+sliding-window:frames=3", 9)])
def test_the_cache_is_sized_once_for_what_the_policies_allow(tiny_wan, registry, spec, frames):
    """A full cache holds the whole video (the last chunk's provisional slot is its own frames), a window its
    frames plus one chunk; nothing is reallocated during the rollout."""
    policies = build_policies(spec, registry.policies) if spec else []
    session = Session(tiny_wan(), policies, RolloutConfig(num_chunks=5, prompts=["a"], seeds=[0]))
    session.run()
    tokens = frames * session.model.tokens_per_frame
    assert session.cache.reallocations == 0
    assert [cell.k.shape[1] for cell in session.cache.cells] == [tokens] * session.model.num_layers
