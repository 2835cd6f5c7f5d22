"""The ``fault`` evaluation policy: positions, each mode on each target, determinism, bad input."""

from __future__ import annotations

import pytest
import torch

from cachepolicy.engine import RolloutConfig, Session
from tests.oracle import stacked
from cachepolicy.errors import ParameterError
from cachepolicy.models import Sampler
from cachepolicy.plugins.fault import Fault, parse_range, swap_sources
from cachepolicy.policy import build_policies

FAST = Sampler(denoising_steps=(1000, 500))


def run(adapter, registry, spec, chunks=3, seeds=(0, 1)):
    policies = build_policies(spec, registry.policies) if spec else []
    session = Session(adapter, policies, RolloutConfig(num_chunks=chunks, prompts=[f"p {s}" for s in seeds],
                                                       seeds=list(seeds), sampler=FAST))
    return session, session.run()


def test_parse_range():
    assert parse_range("2-5", "rows") == (2, 5)
    assert parse_range("3", "rows") == (3, 3)
    assert parse_range("all", "rows") is None
    for bad in ("", "1-", "a-b", "5-2", "-1", "1-2-3"):
        with pytest.raises(ParameterError, match="rows="):
            parse_range(bad, "rows")


def test_positions_rectangle_and_fraction(tiny_wan):
    info = tiny_wan().info  # 4x4 token grid
    assert info.token_rows == info.token_cols == 4
    assert Fault(chunk=0, rows="1-2", cols="0-1").positions(info).tolist() == [4, 5, 8, 9]
    assert Fault(chunk=0, rows="3").positions(info).tolist() == [12, 13, 14, 15]
    assert Fault(chunk=0).positions(info).tolist() == list(range(16))  # rows=all, cols=all
    a = Fault(chunk=0, fraction=0.25, seed=1).positions(info)
    assert a.numel() == 4 and a.tolist() == sorted(set(a.tolist()))
    assert torch.equal(a, Fault(chunk=0, fraction=0.25, seed=1).positions(info))  # deterministic
    assert not torch.equal(a, Fault(chunk=0, fraction=0.25, seed=2).positions(info))
    assert Fault(chunk=0, fraction=0.01).positions(info).numel() == 1  # at least one


def test_swap_sources_is_a_derangement():
    positions = torch.tensor([3, 7, 8, 20, 21])
    sources = swap_sources(positions, seed=4)
    assert sorted(sources.tolist()) == positions.tolist()
    assert not bool((sources == positions).any())
    assert torch.equal(sources, swap_sources(positions, seed=4))


@pytest.mark.parametrize("spec, message", [
    ("fault:rows=1", r"needs parameter\(s\) chunk"),
    ("fault:chunk=-1", r"chunk=-1 is not allowed"),
    ("fault:chunk=1,rows=1-x", r"rows='1-x' is not allowed; write an inclusive range"),
    ("fault:chunk=1,rows=1,fraction=0.2", "not both"),
    ("fault:chunk=1,fraction=1.5", r"fraction=1.5 is not allowed"),
    ("fault:chunk=1,mode=blur", r"mode='blur' is not allowed; choose one of noise, constant, swap"),
    ("fault:chunk=1,target=weights", r"target='weights' is not allowed; choose one of kv, latent"),
    ("fault:chunk=1,scale=inf", r"scale=inf is not allowed"),
])
def test_bad_specs(registry, spec, message):
    with pytest.raises(ParameterError, match=message):
        build_policies(spec, registry.policies)


@pytest.mark.parametrize("spec, message", [
    ("fault:chunk=1,rows=2-4", r"rows='2-4' is outside the token grid .* rows run from 0 to 3"),
    ("fault:chunk=1,rows=1,cols=2,mode=swap", "needs at least two"),
    ("fault:chunk=5,rows=1", r"chunk=5 is never generated; the rollout has 3 chunks"),
])
def test_incompatible_with_the_model_or_rollout(tiny_wan, registry, spec, message):
    with pytest.raises(ParameterError, match=message):
        run(tiny_wan(), registry, spec)


def chunk_tokens(session, chunk, positions):
    """[B, S] mask of resident tokens of ``chunk`` at spatial ``positions``."""
    view = session.cache.view()
    chosen = torch.zeros(session.model.tokens_per_frame, dtype=torch.bool)
    chosen[positions] = True
    return view.valid & (view.chunk == chunk) & chosen[view.spatial_index]


@pytest.mark.parametrize("mode", ["noise", "constant", "swap"])
def test_kv_fault_touches_only_chunk_k_at_the_positions(tiny_wan, registry, mode):
    adapter = tiny_wan(seed=1)
    clean, clean_result = run(adapter, registry, "full", chunks=2)
    spec = f"full+fault:chunk=1,rows=1-2,cols=0-1,mode={mode},scale=3"
    faulty, result = run(adapter, registry, spec, chunks=2)
    positions = [4, 5, 8, 9]
    hit = chunk_tokens(faulty, 1, positions)
    assert int(hit.sum()) == 2 * 3 * 4  # 2 samples x 3 frames x 4 positions
    n = faulty.cache.max_length
    for name in ("k", "v"):
        before, after = stacked(clean.cache, name)[:, :, :n], stacked(faulty.cache, name)[:, :, :n]
        changed = (before != after).any(dim=-1).any(dim=-1)  # [layers, B, S]
        assert torch.equal(changed.any(dim=0), hit), name  # nothing else changed
        assert bool(changed[:, hit].all()), name  # every layer changed at the chosen tokens
        if mode == "constant":
            assert bool((after[:, hit] == 3.0).all())
        if mode == "swap":  # the values at the chosen tokens are a permutation of the clean ones, per frame
            for b in range(2):
                idx = hit[b].nonzero().squeeze(1)
                for frame in range(3, 6):
                    sel = idx[faulty.cache.meta["frame"][b, idx] == frame]
                    got = {tuple(after[0, b, i].flatten().tolist()) for i in sel}
                    want = {tuple(before[0, b, i].flatten().tolist()) for i in sel}
                    assert got == want
    # the fault came after the last forward: latents are untouched; the trace names the positions
    assert torch.equal(result.latents, clean_result.latents)
    assert [r["faulted_positions"] for r in result.trace] == [[[], []], [positions, positions]]


def test_kv_fault_under_guidance_corrupts_both_branches_caches(tiny_wan, registry):
    """With classifier-free guidance the unconditional branch's cache holds the same tokens: the fault
    hits the same tokens there (constant mode: both hold the scale exactly), nothing else."""
    import attrs

    sampler = attrs.evolve(FAST, guidance=2.0)
    sessions = []
    for spec in ("full", "full+fault:chunk=1,rows=1-2,cols=0-1,mode=constant,scale=3"):
        session = Session(tiny_wan(seed=1), build_policies(spec, registry.policies),
                          RolloutConfig(num_chunks=2, prompts=["a b", "c d"], seeds=[0, 1], sampler=sampler))
        session.run()
        sessions.append(session)
    clean, faulty = sessions
    hit = chunk_tokens(faulty, 1, [4, 5, 8, 9])
    n = faulty.cache.max_length
    assert clean.cache.branches == faulty.cache.branches == 2
    for branch in (0, 1):
        for name in ("k", "v"):
            before = stacked(clean.cache, name, branch)[:, :, :n]
            after = stacked(faulty.cache, name, branch)[:, :, :n]
            changed = (before != after).any(dim=-1).any(dim=-1).any(dim=0)  # [B, S]
            assert torch.equal(changed, hit) and bool((after[:, hit] == 3.0).all()), (branch, name)
    # two branches, two sets of keys
    assert not torch.equal(stacked(clean.cache, "k", 0)[:, :, :n], stacked(clean.cache, "k", 1)[:, :, :n])


@pytest.mark.parametrize("mode", ["noise", "constant", "swap"])
def test_latent_fault_corrupts_the_committed_patches(tiny_wan, registry, mode):
    adapter = tiny_wan(seed=2)
    _, clean = run(adapter, registry, "full", chunks=3)
    _, faulty = run(adapter, registry, f"fault:chunk=1,rows=0,cols=1-3,mode={mode},scale=7,target=latent", chunks=3)
    # token (0, c) covers latent pixels rows 0-1, cols 2c..2c+1 (patch 2x2) in frames 3..5
    pixels = torch.zeros(8, 8, dtype=torch.bool)
    pixels[0:2, 2:8] = True
    clean_k, faulty_k = clean.latents[:, :, 3:6], faulty.latents[:, :, 3:6]
    assert torch.equal(clean.latents[:, :, :3], faulty.latents[:, :, :3])
    assert torch.equal(faulty_k[..., ~pixels], clean_k[..., ~pixels])
    assert bool((faulty_k[..., pixels] != clean_k[..., pixels]).all())
    if mode == "constant":
        assert bool((faulty_k[..., pixels] == 7.0).all())
    if mode == "swap":  # each 2x2 patch moved to another chosen token: same multiset of patches
        def patches(x):
            return sorted(tuple(x[..., 0:2, 2 * c:2 * c + 2].flatten().tolist()) for c in (1, 2, 3))
        assert patches(faulty_k[0]) == patches(clean_k[0])
    # later chunks are conditioned on the corrupted commit
    assert (faulty.latents[:, :, 6:] - clean.latents[:, :, 6:]).abs().max() > 1e-4
    assert faulty.trace[1]["faulted_positions"] == [[1, 2, 3], [1, 2, 3]]


@pytest.mark.parametrize("target", ["kv", "latent"])
def test_deterministic_and_batch_invariant(tiny_wan, registry, target):
    adapter = tiny_wan(seed=3)
    spec = f"fault:chunk=0,fraction=0.3,seed=5,scale=2,target={target}"
    _, a = run(adapter, registry, spec, chunks=2, seeds=(0, 1))
    _, b = run(adapter, registry, spec, chunks=2, seeds=(0, 1))
    assert torch.equal(a.latents, b.latents)
    _, alone = run(adapter, registry, spec, chunks=2, seeds=(1,))
    assert (a.latents[1:] - alone.latents).abs().max() <= 1e-5
    _, other = run(adapter, registry, spec.replace("seed=5", "seed=6"), chunks=2, seeds=(0, 1))
    assert not torch.equal(a.latents, other.latents)


def test_latent_patches_are_the_cache_token_order_and_invert():
    from types import SimpleNamespace

    from cachepolicy.plugins.fault import latent_patches, patches_latent

    model = SimpleNamespace(token_rows=2, token_cols=3, latent_height=4, latent_width=6)
    latent = torch.arange(2 * 5 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 5, 3, 4, 6)
    patches = latent_patches(latent, model)
    assert patches.shape == (2, 6, 5, 3, 2, 2)
    for row in range(2):
        for col in range(3):  # token row * cols + col holds the (row, col) patch of every channel and frame
            assert torch.equal(patches[:, row * 3 + col], latent[:, :, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2])
    assert torch.equal(patches_latent(patches, model), latent)
