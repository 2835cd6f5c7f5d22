"""Model wiring (block-causal mask through the stock Wan model), training determinism and resume, sampler."""

from __future__ import annotations

import json

import attrs
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cachepolicy.lab.checkpoint import load_lab_model
from cachepolicy.lab.errors import LabCheckpointError, LabError
from cachepolicy.lab.model import (
    LabConfig,
    load_lab_config,
    block_causal_mask,
    build_transformer,
    chunk_token_timesteps,
    install_masked_attention,
    masked_attention,
)
from cachepolicy.lab.sampling import sample_latents, sample_video, save_grid, sigma_schedule
from cachepolicy.lab.scenes import SceneConfig
from cachepolicy.lab.text import TextConfig, embed_prompts
from cachepolicy.lab.train import TrainConfig, make_batch, sample_sigmas, train

TINY = LabConfig(
    scene=SceneConfig(num_frames=6, height=8, width=8, sprite_size=3, max_sprites=2),
    text=TextConfig(max_words=20, word_dim=8, pos_dim=4),
    dim_head=12, heads=2, layers=2, ffn_dim=32, freq_dim=16, sampler_steps=3, sampler_guidance=1.0,
)
PROMPT = "a red square and a blue disc bouncing fast over a navy-to-teal gradient"


def _randomised(config: LabConfig, seed: int = 0) -> torch.nn.Module:
    model = build_transformer(config, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def test_block_causal_mask_structure():
    m = block_causal_mask(3, 2)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2, dtype=torch.bool)
    assert torch.equal(m, expected)
    ts = chunk_token_timesteps(torch.tensor([[0.0, 0.5]]), 3)
    assert torch.equal(ts, torch.tensor([[0.0, 0, 0, 500, 500, 500]]))


def test_masked_forward_is_block_causal_through_stock_wan():
    torch.manual_seed(0)
    model = _randomised(TINY)
    h, w = TINY.latent_hw
    tpc = TINY.tokens_per_frame * TINY.chunk_frames
    x = torch.randn(1, TINY.latent.channels, 6, h, w)
    text = embed_prompts([PROMPT], TINY.text)
    ts = chunk_token_timesteps(torch.tensor([[0.0, 0.7]]), tpc)
    with masked_attention(model, block_causal_mask(2, tpc)):
        full = model(x, ts, text, return_dict=False)[0]
        x2 = x.clone()
        x2[:, :, 3:] = torch.randn_like(x2[:, :, 3:])  # change only the second chunk
        changed = model(x2, ts, text, return_dict=False)[0]
    with masked_attention(model, block_causal_mask(1, tpc)):
        prefix = model(x[:, :, :3], ts[:, :tpc], text, return_dict=False)[0]
    assert torch.allclose(full[:, :, :3], changed[:, :, :3], atol=1e-6)  # earlier chunk never sees later
    assert torch.allclose(full[:, :, :3], prefix, atol=1e-5)  # = running the prefix alone
    assert not torch.allclose(full[:, :, 3:], changed[:, :, 3:])
    unmasked = model(x2, ts, text, return_dict=False)[0]
    assert not torch.allclose(unmasked[:, :, :3], full[:, :, :3])  # the mask really was in effect
    proc = install_masked_attention(model)
    assert proc.mask is None and all(b.attn1.processor is proc for b in model.blocks)
    with pytest.raises(LabError, match="covers"), masked_attention(model, block_causal_mask(3, tpc)):
        model(x, ts, text)


def test_batches_and_sigmas_are_pure_functions_of_seed_and_step():
    tc = TrainConfig(batch_size=3)
    a, b = make_batch(TINY, tc, 5, 11), make_batch(TINY, tc, 5, 11)
    assert torch.equal(a["x0"], b["x0"]) and a["prompts"] == b["prompts"]
    assert a["x0"].shape == (3, 12, 6, 4, 4) and a["sprite"].shape == (3, 1, 6, 4, 4)
    assert not torch.equal(a["x0"], make_batch(TINY, tc, 5, 12)["x0"])
    sig, in_loss = sample_sigmas(TrainConfig(clean_prefix_prob=1.0), 64, 4, torch.Generator().manual_seed(0))
    assert ((sig == 0) == ~in_loss).all() and (~in_loss[:, 0]).all() and in_loss[:, -1].all()
    assert ((sig >= 0) & (sig <= 1)).all()


def test_training_resumes_exactly(tmp_path):
    tc = TrainConfig(steps=4, batch_size=2, warmup=2)
    train(tmp_path / "straight", TINY, tc, seed=3, minutes=None, checkpoint_every=0)
    train(tmp_path / "resumed", TINY, TrainConfig(steps=2, batch_size=2, warmup=2), seed=3, minutes=None,
          checkpoint_every=0)
    # a different learning rate or seed is a different run: refuse to resume into it
    with pytest.raises(LabCheckpointError, match="different configuration"):
        train(tmp_path / "resumed", TINY, TrainConfig(steps=2, batch_size=2, warmup=2, lr=1e-4), seed=3,
              minutes=None)
    with pytest.raises(LabCheckpointError, match="different configuration"):
        train(tmp_path / "resumed", TINY, TrainConfig(steps=2, batch_size=2, warmup=2), seed=4, minutes=None)
    # resuming with the same arguments continues to the end and matches the uninterrupted run
    train(tmp_path / "resumed2", TINY, tc, seed=3, minutes=0.0, checkpoint_every=0)  # stops at once
    state = json.loads((tmp_path / "resumed2" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 0
    train(tmp_path / "resumed2", TINY, tc, seed=3, minutes=None, checkpoint_every=2)
    a = load_file(str(tmp_path / "straight" / "final" / "weights.safetensors"))
    b = load_file(str(tmp_path / "resumed2" / "final" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, config = load_lab_model(tmp_path / "straight" / "final")
    assert config == TINY
    record = json.loads((tmp_path / "straight" / "final" / "train.json").read_text())
    assert record["steps_done"] == 4 and record["trained_context_chunks"] == 2


def test_interrupted_resume_matches_straight_run(tmp_path):
    tc = TrainConfig(steps=4, batch_size=2, warmup=2)
    train(tmp_path / "a", TINY, tc, seed=1, minutes=None, checkpoint_every=0)
    # run 2 steps then "crash": emulate by a run whose checkpoint stops at step 2
    import cachepolicy.lab.train as T

    calls = {"n": 0}
    original = T.make_batch

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    T.make_batch = crashing
    try:
        train(tmp_path / "b", TINY, tc, seed=1, minutes=None, checkpoint_every=0)
    finally:
        T.make_batch = original
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    train(tmp_path / "b", TINY, tc, seed=1, minutes=None, checkpoint_every=0)
    a = load_file(str(tmp_path / "a" / "final" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampler_shapes_schedule_and_grid(tmp_path):
    s = sigma_schedule(4, 3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and (s[1:] < s[:-1]).all()
    with pytest.raises(LabError, match="steps"):
        sigma_schedule(0)
    model = _randomised(TINY)
    z = sample_latents(model, TINY, [PROMPT, PROMPT], num_chunks=3, seed=0)
    assert z.shape == (2, 12, 9, 4, 4) and torch.isfinite(z).all()
    again = sample_latents(model, TINY, [PROMPT, PROMPT], num_chunks=2, seed=0)
    assert torch.allclose(z[:, :, :6], again, atol=1e-5)  # chunk k never depends on later chunks
    v = sample_video(model, TINY, [PROMPT], num_chunks=1, guidance=2.0)
    assert v.shape == (1, 3, 3, 8, 8) and np.isfinite(v).all()
    path = save_grid([v[0], v[0][:2]], tmp_path / "g.png", scale=2)
    assert path.is_file()


@pytest.mark.parametrize("noise, guidance", [("fresh", 1.0), ("predicted", 1.0), ("fresh", 2.5)])
def test_sampler_steps_follow_the_reference_formula(noise, guidance):
    """One chunk by hand: ``x0 = x - sigma * v``; ``fresh`` re-noises ``(1 - s') * x0 + s' * eps`` with the
    chunk generator's next draws, ``predicted`` takes the Euler step ``x + (s' - s) * v``; with guidance
    ``v = u + w (c - u)`` from the prompt's and the zero (empty-prompt) embedding."""
    config = attrs.evolve(TINY, sampler_noise=noise, sampler_guidance=guidance)
    model = _randomised(config)
    got = sample_latents(model, config, [PROMPT], num_chunks=1, seed=5)
    sigmas = sigma_schedule(config.sampler_steps, config.sampler_shift).tolist()  # [1, 2/3, 1/3, 0]
    g = torch.Generator().manual_seed(5 * 100_003)
    x = torch.randn(1, 12, 3, 4, 4, generator=g)
    text = embed_prompts([PROMPT], config.text)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((1, 3 * 16), 1000.0 * sigma)
            v = model(x, t, text, return_dict=False)[0]
            if guidance != 1.0:
                u = model(x, t, embed_prompts([""], config.text), return_dict=False)[0]
                v = u + guidance * (v - u)
            x0 = x - sigma * v
            if noise == "fresh" and sigma_next > 0:
                x = (1 - sigma_next) * x0 + sigma_next * torch.randn(x.shape, generator=g)
            else:
                x = x + (sigma_next - sigma) * v
    assert torch.allclose(got, x, atol=1e-5)
    other = sample_latents(model, config, [PROMPT], num_chunks=1, seed=5,
                           noise="predicted" if noise == "fresh" else "fresh")
    assert (got - other).abs().max() > 1e-3  # the two samplers really differ


def test_sampler_noise_is_validated_and_old_configs_mean_euler():
    with pytest.raises(LabError, match=r"sampler_noise='ddim' is not allowed; choose one of fresh, predicted"):
        LabConfig(sampler_noise="ddim")
    with pytest.raises(LabError, match=r"sampler_steps must be a positive int, got 0"):
        LabConfig(sampler_steps=0)
    with pytest.raises(LabError, match=r"sampler_guidance must be a finite scale >= 0 \(1 = no guidance\), got -2"):
        LabConfig(sampler_guidance=-2)
    with pytest.raises(LabError, match=r"noise='ddim' is not allowed"):
        sample_latents(_randomised(TINY), TINY, [PROMPT], num_chunks=1, noise="ddim")
    data = attrs.evolve(TINY, sampler_guidance=2.0).to_dict()
    assert load_lab_config(data).sampler_guidance == 2.0 and LabConfig().sampler_noise == "fresh"
    del data["sampler_noise"], data["sampler_guidance"]
    # a config.json written before the fields existed was sampled with Euler steps and no guidance
    assert load_lab_config(data) == attrs.evolve(TINY, sampler_noise="predicted", sampler_guidance=1.0)


def test_sampling_cli_writes_grid_and_metrics(tmp_path):
    from cachepolicy.lab.sampling import main

    train(tmp_path / "run", TINY, TrainConfig(steps=1, batch_size=1, warmup=1), seed=0, minutes=None,
          checkpoint_every=0)
    out = tmp_path / "grid.png"
    main(["--weights", str(tmp_path / "run" / "final"), "--out", str(out), "--num", "2", "--chunks", "2",
          "--steps", "2"])
    assert out.is_file()
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["prompts"]) == 2 and len(report["per_chunk_mean"]["count_error"]) == 2


def test_lr_schedule_warmup_stable_decay_and_config_errors():
    tc = TrainConfig(steps=1000, lr=1e-3, warmup=100, decay_fraction=0.3, min_lr_ratio=0.1)
    assert tc.lr_at(0) == pytest.approx(1e-5) and tc.lr_at(99) == pytest.approx(1e-3)
    assert tc.lr_at(500) == tc.lr_at(699) == 1e-3
    assert tc.lr_at(850) < 1e-3 and tc.lr_at(1000) == pytest.approx(1e-4)
    with pytest.raises(LabError, match="clean_prefix_prob"):
        TrainConfig(clean_prefix_prob=1.5)
    with pytest.raises(LabError, match="steps"):
        TrainConfig(steps=0)


def test_schedule_may_be_extended_during_the_constant_phase(tmp_path):
    short = TrainConfig(steps=20, batch_size=1, warmup=1, decay_fraction=0.5)
    train(tmp_path / "r", TINY, short, seed=0, minutes=None, checkpoint_every=0, stop_at=3)
    longer = TrainConfig(steps=40, batch_size=1, warmup=1, decay_fraction=0.5)
    train(tmp_path / "r", TINY, longer, seed=0, minutes=None, checkpoint_every=0, stop_at=5)
    state = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and state["train"]["steps"] == 40
    # once the short schedule has started decaying, its history differs from the long one: refused
    train(tmp_path / "d", TINY, short, seed=0, minutes=None, checkpoint_every=0, stop_at=12)
    with pytest.raises(LabCheckpointError, match="constant"):
        train(tmp_path / "d", TINY, longer, seed=0, minutes=None, checkpoint_every=0, stop_at=13)
