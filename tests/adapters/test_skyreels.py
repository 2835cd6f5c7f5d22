"""SkyReels-V2 (second model family): cached rollouts equal stock ``SkyReelsV2Transformer3DModel`` forwards.

The oracle replays every logged forward of a cached rollout as one stock diffusion-forcing forward
(``timestep`` ``[B, F]``, the fps embedding, every parameter random) over all committed chunks plus the
current one, with the block-causal mask restricted to the logged keep sets injected into each ``attn1``
(:func:`cachepolicy.adapters.skyreels.adapter.masked_forward`); without eviction the stock model's *own*
causal-block mask is the reference instead. Float32, tolerance 1e-5 (measured: ~1e-6).
"""

from __future__ import annotations

import json
import math

import attrs
import pytest
import torch
from safetensors.torch import load_file, save_file

import cachepolicy as cp
from cachepolicy.adapters.skyreels.adapter import SkyReelsV2Adapter, load_tiny_skyreels, masked_forward
from tests.oracle import adapter_forward, layer_keys
from cachepolicy.adapters.wan.adapter import block_causal_mask
from cachepolicy.errors import CacheShapeError, CheckpointError, ParameterError
from cachepolicy.models import Sampler
from tests.oracle import oracle_masks, run_recorded

TOLERANCE = 1e-5  # fp32
FAST = Sampler(denoising_steps=(1000, 500))


def replay(adapter: SkyReelsV2Adapter, result, records, *, own_mask: bool = False) -> float:
    """Largest |cached - stock| output over every logged forward. ``own_mask``: use the stock model's own
    causal-block mask (valid without eviction) instead of the mask built from the keep sets."""
    info = adapter.info
    F, tpf = info.frames_per_chunk, info.tokens_per_frame
    batch = result.latents.shape[0]
    conditioning = adapter.encode_prompts(list(result.config.prompts))
    block = adapter.model.config.num_frame_per_block
    worst = 0.0
    for fwd in records["forwards"]:
        c = fwd["chunk"]
        x = torch.cat([result.latents[:, :, : c * F], fwd["x_t"]], dim=2)
        timesteps = torch.tensor([0.0] * (c * F) + [fwd["timestep"]] * F).expand(batch, -1)
        mask = None
        if not own_mask:
            masks = oracle_masks(c, F, tpf, records["commits"], fwd["resident"], batch)
            mask = masks[0][:, :1]  # per-token policies: every layer and head holds the same tokens
            assert all(torch.equal(m, mask.expand_as(m)) for m in masks)
            if 1 < block < F:  # causal blocks inside a chunk, as the stock model has them
                mask = mask & block_causal_mask(block, (c + 1) * F, tpf)
        full = masked_forward(adapter.model, x, timesteps, conditioning, mask, fps=adapter.fps)
        worst = max(worst, float((full[:, :, c * F:] - fwd["output"]).abs().max()))
    return worst


# ----------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("spec", [
    "full",
    "attention-sink:frames=3+sliding-window:frames=6",
    "tokentrim:p=0.3,lambda=0+attention-sink:frames=3+sliding-window:frames=6",
])
def test_cached_rollout_matches_stock_forward_with_keep_set_mask(registry, spec):
    adapter = load_tiny_skyreels(seed=1)
    result, records, _ = run_recorded(adapter, registry, spec, num_chunks=5, seeds=[0, 1], sampler=FAST)
    assert len(records["forwards"]) >= 5 * 2 and result.latents.shape[0] == 2
    if spec != "full":  # the policy really dropped tokens
        assert min(len(ids) for ids in records["forwards"][-1]["resident"][0][0]) < 4 * 3 * adapter.info.tokens_per_frame
    if spec.startswith("tokentrim"):  # samples pruned differently: the padded (key-mask) path ran
        assert any(len({len(ids) for ids in fwd["resident"][0][0]}) > 1 for fwd in records["forwards"])
    worst = replay(adapter, result, records)
    print(f"{spec}: max |diff| = {worst:.3g}")
    assert worst <= TOLERANCE


def test_full_cache_matches_skyreels_own_causal_block_mask(registry):
    """Independent of the oracle's mask: with nothing evicted, the stock model's own diffusion-forcing mask."""
    adapter = load_tiny_skyreels(seed=2)
    result, records, _ = run_recorded(adapter, registry, "full", num_chunks=4, seeds=[0, 1], sampler=FAST)
    assert replay(adapter, result, records, own_mask=True) <= TOLERANCE


def test_causal_blocks_inside_a_chunk(registry):
    """causal_block_size=2 with 4-frame chunks: the in-chunk block structure equals the stock model's."""
    adapter = load_tiny_skyreels(seed=3, causal_block_size=2, frames_per_chunk=4)
    assert adapter.chunk_mask(4, "cpu") is not None
    result, records, _ = run_recorded(adapter, registry, "full", num_chunks=3, seeds=[0], sampler=FAST)
    assert replay(adapter, result, records, own_mask=True) <= TOLERANCE
    result, records, _ = run_recorded(adapter, registry, "attention-sink:frames=2+sliding-window:frames=4",
                                      num_chunks=4, seeds=[0, 1], sampler=FAST)
    assert replay(adapter, result, records) <= TOLERANCE


def test_oracle_detects_a_wrong_mask(registry):
    adapter = load_tiny_skyreels(seed=2)
    result, records, _ = run_recorded(adapter, registry, "full", num_chunks=4, seeds=[0], sampler=FAST)
    tpf = adapter.info.tokens_per_frame
    for fwd in records["forwards"]:
        if fwd["chunk"] == 3:  # pretend the last chunk only saw the most recent 3 frames
            fwd["resident"] = [[[ids[ids >= 6 * tpf] for ids in head] for head in layer] for layer in fwd["resident"]]
    assert replay(adapter, result, records) > 1e-3


# ------------------------------------------------------------------------------ per-frame timesteps
def test_per_frame_timesteps_equal_the_stock_diffusion_forcing_forward():
    adapter = load_tiny_skyreels(seed=4)
    F, shape = 3, (2, 4, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    context, chunk = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    conditioning = adapter.encode_prompts(["a red square", "two blue circles"])
    cache = adapter.new_cache(2)
    adapter_forward(adapter, context, torch.zeros(2, F), 0, 0, cache, conditioning, True)
    timesteps = torch.tensor([[900.0, 500.0, 100.0], [800.0, 400.0, 50.0]])
    out = adapter_forward(adapter, chunk, timesteps, F, 1, cache, conditioning, False)
    full_t = torch.cat([torch.zeros(2, F), timesteps], dim=1)
    stock = masked_forward(adapter.model, torch.cat([context, chunk], dim=2), full_t, conditioning, None)
    assert float((stock[:, :, F:] - out).abs().max()) <= TOLERANCE
    uniform = adapter_forward(adapter, chunk, torch.full((2, F), 500.0), F, 1, cache, conditioning, False)
    assert float((uniform - out).abs().max()) > 1e-3  # the per-frame values matter
    with pytest.raises(CacheShapeError, match="want \\[B, F\\]"):
        adapter_forward(adapter, chunk, torch.zeros(2), F, 1, cache, conditioning, False)


def test_rope_start_positions_and_metadata():
    adapter = load_tiny_skyreels(seed=5)
    latent = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    conditioning = adapter.encode_prompts(["x"])
    caches = [adapter.new_cache(1) for _ in range(3)]
    timesteps = torch.full((1, 3), 250.0)
    a = adapter_forward(adapter, latent, timesteps, 0, 0, caches[0], conditioning, True)
    b = adapter_forward(adapter, latent, timesteps, 6, 2, caches[1], conditioning, True, rope_start=0)
    adapter_forward(adapter, latent, timesteps, 6, 2, caches[2], conditioning, True)
    assert torch.equal(a, b)
    tpc = 3 * adapter.info.tokens_per_frame
    keys = [torch.stack([layer_keys(c, layer)[:, :tpc] for layer in range(adapter.info.num_layers)]) for c in caches]
    assert torch.equal(keys[0], keys[1])  # keys rotated to frames 0..2
    assert float((keys[0] - keys[2]).abs().max()) > 1e-2  # ... not 6..8
    view = caches[1].view()
    assert view.frame[0].unique().tolist() == [6, 7, 8] and view.rope_pos[0].unique().tolist() == [0, 1, 2]


def test_token_grid_and_stock_behaviour_outside_a_forward(tiny_wan):
    adapter = load_tiny_skyreels(seed=0)
    latent = torch.randn(2, 4, 3, 8, 8)
    assert torch.equal(adapter.token_grid(latent), tiny_wan(seed=0).token_grid(latent))
    x, t = torch.randn(1, 4, 6, 8, 8), torch.full((1, 6), 300.0)
    conditioning = adapter.encode_prompts(["y"])
    with torch.no_grad():
        attached = masked_forward(adapter.model, x, t, conditioning, None)
        stock = masked_forward(adapter.detach(), x, t, conditioning, None)
    assert torch.equal(attached, stock)


def test_options_are_checked():
    with pytest.raises(ParameterError, match="not a multiple"):
        load_tiny_skyreels(frames_per_chunk=4)
    with pytest.raises(ParameterError, match="fps"):
        load_tiny_skyreels(fps=30)
    with pytest.raises(ParameterError, match="unknown tiny-skyreels config keys"):
        load_tiny_skyreels(window_size=3)


# ------------------------------------------------------------------------------------ strict loader
@pytest.fixture
def saved(tmp_path):
    from cachepolicy.adapters.skyreels.adapter import tiny_skyreels_model

    model = tiny_skyreels_model(seed=6)
    model.save_pretrained(tmp_path / "ok")
    return model, tmp_path / "ok"


def test_diffusers_folder_loads_and_matches(saved, registry):
    model, folder = saved
    adapter = cp.load_model("skyreels-diffusers", path=str(folder), latent_size="8x8")
    assert isinstance(adapter, SkyReelsV2Adapter) and adapter.info.frames_per_chunk == 3
    for key, value in model.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[key], value), key
    assert registry.models["tiny-skyreels"].adapter == "skyreels"


@pytest.mark.parametrize("change, expected", [
    ("missing", r"1 missing key:\s+blocks\.0\.attn1\.to_q\.weight"),
    ("unexpected", r"1 unexpected key:\s+blocks\.0\.attn1\.extra"),
    ("shape", r"blocks\.1\.ffn\.net\.2\.weight: checkpoint \[3, 48\], model \[24, 48\]"),
])
def test_diffusers_folder_is_strict(saved, change, expected):
    _, folder = saved
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    if change == "missing":
        del state["blocks.0.attn1.to_q.weight"]
    elif change == "unexpected":
        state["blocks.0.attn1.extra"] = torch.zeros(2)
    else:
        state["blocks.1.ffn.net.2.weight"] = torch.zeros(3, 48)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=expected) as info:
        cp.load_model("skyreels-diffusers", path=str(folder), latent_size="8x8")
    assert "SkyReelsV2Transformer3DModel(" in str(info.value)


def test_diffusers_folder_errors(saved, tmp_path, tiny_wan):
    with pytest.raises(CheckpointError, match="no config.json"):
        cp.load_model("skyreels-diffusers", path=str(tmp_path / "missing"))
    tiny_wan(seed=0).detach().save_pretrained(tmp_path / "wan")
    with pytest.raises(CheckpointError, match="holds a WanTransformer3DModel, not a SkyReelsV2Transformer3DModel"):
        cp.load_model("skyreels-diffusers", path=str(tmp_path / "wan"))
    with pytest.raises(ParameterError, match="needs path"):
        cp.load_model("skyreels-diffusers")
    with pytest.raises(ParameterError, match="no options"):
        cp.load_model("skyreels-diffusers", path=str(saved[1]), bogus=1)


# --------------------------------------------------------------------------------------- compare
def test_compare_runs_both_families_in_one_call(tmp_path):
    """One ``compare`` runs the same grid on a Wan and a SkyReels model; every job has finite metrics."""
    from cachepolicy.compare import CompareConfig, run_compare

    models = ("tiny-wan", "tiny-skyreels")
    policies = ["full", "attention-sink:frames=3+sliding-window:frames=3"]
    config = CompareConfig(models=models, policies=policies, prompts=["a red square"], seeds=[0, 1], num_chunks=3,
                           metrics=["latent-drift", "flicker", "cache-tokens"])
    summary = run_compare(config, tmp_path / "cmp")
    lines = [json.loads(line) for line in (tmp_path / "cmp" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    assert sorted((line["model"], line["policy"], line["seed"]) for line in lines) == sorted(
        (m, p, s) for m in models for p in policies for s in (0, 1))
    for line in lines:
        values = [v for v in line["metrics"].values() if isinstance(v, (int, float))]
        assert values and all(math.isfinite(v) for v in values), (line["model"], line["policy"], line["seed"])
    assert list(summary["policies"]) == [f"{m}: {p}" for m in models for p in policies]
    assert all(data["jobs"] == 2 for data in summary["policies"].values())


def test_model_info_names_the_in_call_causal_blocks(tiny_wan):
    """``ModelInfo.causal_block_frames``: what a loop that puts several chunks in one call relies on."""
    assert load_tiny_skyreels(seed=0).info.causal_block_frames == 3
    assert load_tiny_skyreels(seed=0, causal_block_size=2, frames_per_chunk=4).info.causal_block_frames == 2
    assert load_tiny_skyreels(seed=0, causal_block_size=1).info.causal_block_frames is None  # stock: no mask
    assert tiny_wan(seed=0).info.causal_block_frames is None
    # a two-chunk call is block-causal: its first chunk's output does not depend on its second
    adapter = load_tiny_skyreels(seed=0)
    conditioning = adapter.encode_prompts(["a"])
    x = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, :, 3:] += 1.0
    t = torch.full((1, 6), 500.0)
    a = adapter_forward(adapter, x, t, 0, 0, adapter.new_cache(1), conditioning, False)
    b = adapter_forward(adapter, y, t, 0, 0, adapter.new_cache(1), conditioning, False)
    assert torch.equal(a[:, :, :3], b[:, :, :3]) and float((a[:, :, 3:] - b[:, :, 3:]).abs().max()) > 1e-3
    with pytest.raises(ParameterError, match="causal_block_frames must be a positive integer, got 0"):
        attrs.evolve(adapter.info, causal_block_frames=0)
