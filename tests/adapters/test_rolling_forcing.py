"""RoPE modes and the ``rolling-forcing`` recipe against a plain reimplementation of Rolling Forcing's loop.

The reference below is written from TencentARC/RollingForcing@a1477d0 (``pipeline/rolling_forcing_inference.py``,
``wan/modules/causal_model.py``; docs "Recipes"), not from this project's engine or cache: a 24-frame
physical K/V buffer per layer with ``global_end_index`` / ``local_end_index``, the anchor stored before
RoPE in slots 0..2 (written raw only when ``local_start == 0``) and re-rotated on read
(``causal_rope_apply`` at ``rope_start_frame``), the roll that keeps slots 0..2, only the first block of
each call written, the original's extract ranges, its start/end-of-video timestep slicing and a context
pass after every window. Stock diffusers modules do everything else. Only the noise draws are shared with
the engine (inputs, not semantics).
"""

from __future__ import annotations

import attrs
import pytest
import torch
import torch.nn.functional as F

import cachepolicy.adapters.wan.adapter as wan_adapter
from cachepolicy.adapters.wan.tiny import load_tiny_wan
from tests.adapters.original import OriginalBuffer, project_qkv, rotate
from tests.oracle import adapter_forward, layer_keys
from cachepolicy.api import build_policies
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.noise import noise_seed
from cachepolicy.errors import ParameterError
from cachepolicy.recipes import Recipe, get_recipe, merge_policy_specs

TOL = 1e-5
PROMPTS = ("a red fox runs", "a blue bird flies")
SEEDS = (11, 12)


# ------------------------------------------------------------------------------------ RoPE modes
def _rollout(adapter, recipe, num_chunks, specs):
    policies = build_policies(*specs) if specs else []
    config = RolloutConfig(num_chunks=num_chunks, prompts=PROMPTS, seeds=SEEDS, recipe=recipe)
    session = Session(adapter, policies, config)
    return session.run(), session


@pytest.mark.parametrize("base,specs,chunks", [
    ("self-forcing", ("attention-sink:frames=3+sliding-window:frames=6",), 6),
    ("causvid", (), 9),  # restarts: resident keys at rope_pos != frame
    # TokenTrim prunes some samples only: a non-uniform batch (per-sample key positions)
    ("self-forcing", ("attention-sink:frames=3+sliding-window:frames=6", "tokentrim:p=0.2,lambda=0,warmup=2"), 8),
])
def test_raw_rope_mode_rollout_equals_absolute(base, specs, chunks):
    recipe = get_recipe(base)
    absolute, _ = _rollout(load_tiny_wan(seed=3), recipe, chunks, specs)
    raw, session = _rollout(load_tiny_wan(seed=3), attrs.evolve(recipe, name=base + "-raw", rope_mode="raw"),
                            chunks, specs)
    assert session.cache.rope_mode == "raw"
    if len(specs) > 1:
        assert not session.cache.uniform
    diff = (raw.latents - absolute.latents).abs().max().item()
    assert diff <= TOL, diff


def test_raw_read_with_overridden_positions_rotates_keys_by_hand(monkeypatch):
    adapter = load_tiny_wan(seed=3)
    info = adapter.info
    tpf, frames = info.tokens_per_frame, info.frames_per_chunk
    cond = adapter.encode_prompts(list(PROMPTS))
    cache = adapter.new_cache(2, rope_mode="raw")
    generator = torch.Generator().manual_seed(0)
    shape = (2, info.latent_channels, frames, info.latent_height, info.latent_width)
    for chunk in range(2):
        latent = torch.randn(shape, generator=generator)
        adapter_forward(adapter, latent, torch.zeros(2, frames), chunk * frames, chunk, cache, cond, True)
    size = cache.max_length
    raw_keys = layer_keys(cache, 0)[:, :size].clone()  # layer 0, stored before RoPE
    view = cache.view()
    override = torch.where(view.chunk == 0, view.frame + 7, view.rope_pos)  # chunk 0 to positions 7..9

    seen = []
    original = wan_adapter.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        seen.append(key.clone())
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(wan_adapter, "dispatch_attention_fn", spy)
    latent = torch.randn(shape, generator=generator)
    adapter_forward(adapter, latent, torch.full((2, frames), 500.0), 2 * frames, 2, cache, cond, False,
                    rope_positions=override)
    keys = seen[0]  # layer 0: [B, S + n, H, D]

    # by hand: diffusers' own rotary tables of a full-length forward, sliced at the wanted frames
    model = adapter.model
    full = torch.zeros(1, info.latent_channels, 12, info.latent_height, info.latent_width)
    wan_adapter._suspend_rope_hook(model)  # stock tables (the hook is not re-registered: adapter not reused)
    cos, sin = model.rope(full)

    def table(first):
        return cos[:, first * tpf:(first + frames) * tpf], sin[:, first * tpf:(first + frames) * tpf]

    expected_anchor = rotate(raw_keys[:, :frames * tpf], *table(7))
    expected_chunk1 = rotate(raw_keys[:, frames * tpf:], *table(frames))
    assert (keys[:, :frames * tpf] - expected_anchor).abs().max().item() <= 1e-6
    assert (keys[:, frames * tpf:size] - expected_chunk1).abs().max().item() <= 1e-6
    assert (keys[:, :frames * tpf] - rotate(raw_keys[:, :frames * tpf], *table(0))).abs().max().item() > 1e-3
    # the call's own keys: rotated at its positions 6..8, the same as an absolute-mode cache stores them
    own_raw = layer_keys(cache, 0)[:, size:size + frames * tpf]
    assert (keys[:, size:] - rotate(own_raw, *table(2 * frames))).abs().max().item() <= 1e-6


def test_rope_positions_need_a_raw_cache():
    adapter = load_tiny_wan(seed=3)
    info = adapter.info
    cache = adapter.new_cache(1)
    cond = adapter.encode_prompts(["a"])
    latent = torch.zeros(1, info.latent_channels, 3, info.latent_height, info.latent_width)
    adapter_forward(adapter, latent, torch.zeros(1, 3), 0, 0, cache, cond, True)
    with pytest.raises(ParameterError, match="rope_mode='raw'"):
        adapter_forward(adapter, latent, torch.zeros(1, 3), 3, 1, cache, cond, False,
                        rope_positions=cache.view().rope_pos)


# ------------------------------------------------------------------------- Rolling Forcing's loop
class RollingAttention:
    """``CausalWanSelfAttention.forward`` with a cache, in tokens."""

    def __init__(self, layer, run):
        self.layer, self.run = layer, run

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        run = self.run
        q, k, v = project_qkv(attn, hidden_states)
        cos, sin = rotary_emb  # frames current_start_frame .. of this call
        roped_q, roped_k = rotate(q, cos, sin), rotate(k, cos, sin)
        cache = run.caches[self.layer]
        block = run.block_tokens
        cache_start = run.current_start
        cache_end = cache_start + block  # only the first block is cached
        num_new = cache_end - cache.global_end
        size = cache.k.shape[1]
        sink = block
        if num_new > 0 and num_new + cache.local_end > size:
            evicted = num_new + cache.local_end - size
            rolled = cache.local_end - evicted - sink
            cache.k[:, sink:sink + rolled] = cache.k[:, sink + evicted:sink + evicted + rolled].clone()
            cache.v[:, sink:sink + rolled] = cache.v[:, sink + evicted:sink + evicted + rolled].clone()
            local_end = cache.local_end + cache_end - cache.global_end - evicted
            local_start = local_end - block
            cache.k[:, local_start:local_end] = roped_k[:, :block]
            cache.v[:, local_start:local_end] = v[:, :block]
        else:
            local_end = cache.local_end + cache_end - cache.global_end
            local_start = local_end - block
            if local_start == 0:  # the first block is stored before RoPE
                cache.k[:, local_start:local_end] = k[:, :block]
            else:
                cache.k[:, local_start:local_end] = roped_k[:, :block]
            cache.v[:, local_start:local_end] = v[:, :block]
        if num_new > 0:
            cache.global_end = cache_end
            cache.local_end = local_end
        if local_start == 0:
            keys, values = roped_k, v
        elif run.updating_cache:
            start = max(0, local_end - run.max_attention)
            keys = cache.k[:, start:local_end].clone()
            values = cache.v[:, start:local_end]
            if start == 0:
                keys[:, :block] = rotate(keys[:, :block], *run.table(0))
        else:
            working_max = run.max_attention - q.shape[1] - block
            end = local_start
            start = max(block, local_start - working_max)
            working_k, working_v = cache.k[:, start:end], cache.v[:, start:end]
            working_frames = working_k.shape[1] // run.tokens_per_frame
            rope_start_frame = run.current_start_frame - working_frames - 3
            if not run.rerotate_anchor:  # the ablation: the anchor kept at its own positions 0..2
                rope_start_frame = 0
            anchor_k = rotate(cache.k[:, :block], *run.table(rope_start_frame))
            keys = torch.cat([anchor_k, working_k, roped_k], dim=1)
            values = torch.cat([cache.v[:, :block], working_v, v], dim=1)
        out = F.scaled_dot_product_attention(roped_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class RollingRun:
    """A stock diffusers model driven like ``RollingForcingInferencePipeline.inference``."""

    def __init__(self, model, batch, tokens_per_frame, total_frames, latent_hw, rerotate_anchor=True):
        self.model = model
        self.tokens_per_frame = tokens_per_frame
        self.block_tokens = 3 * tokens_per_frame
        self.max_attention = 21 * tokens_per_frame
        self.rerotate_anchor = rerotate_anchor
        heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
        self.caches = [OriginalBuffer(batch, 24 * tokens_per_frame, heads, dim) for _ in model.blocks]
        for layer, block in enumerate(model.blocks):
            block.attn1.set_processor(RollingAttention(layer, self))
        full = torch.zeros(1, model.config.in_channels, total_frames, *latent_hw)
        self.full_cos, self.full_sin = model.rope(full)
        self.rope = None
        model.rope.forward = lambda hidden_states: self.rope

    def table(self, start_frame, frames=3):
        tpf = self.tokens_per_frame
        return (self.full_cos[:, start_frame * tpf:(start_frame + frames) * tpf],
                self.full_sin[:, start_frame * tpf:(start_frame + frames) * tpf])

    def forward(self, latent, frame_timesteps, start_frame, cond, updating_cache=False):
        frames = latent.shape[2]
        self.rope = self.table(start_frame, frames)
        self.current_start_frame = start_frame
        self.current_start = start_frame * self.tokens_per_frame
        self.updating_cache = updating_cache
        t = frame_timesteps.repeat_interleave(self.tokens_per_frame, dim=1)  # per-frame timesteps, per token
        with torch.no_grad():
            return self.model(hidden_states=latent, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]


def block_noise(block, use, shape):
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(s, block, use))) for s in SEEDS]
    return torch.stack(draws)


def original_rolling_forcing(run, num_blocks, cond, timesteps, sigmas, shape):
    """``inference`` of ``rolling_forcing_inference.py``: windows, re-noising, a context pass per window."""
    W, nf = len(timesteps), 3
    batch = len(SEEDS)

    def step_of(t):  # the original's match: |denoising_step_list - t| < 1e-4
        return min(range(W), key=lambda i: abs(timesteps[i] - float(t)))
    num_frames = num_blocks * nf
    noisy_cache = {}
    output = {}
    shared = torch.ones(batch, W * nf)
    for index, t in enumerate(reversed(timesteps)):  # clean -> noisy
        shared[:, index * nf:(index + 1) * nf] *= t
    for w in range(num_blocks + W - 1):
        start_block, end_block = max(0, w - W + 1), min(num_blocks - 1, w)
        start_frame, end_frame = start_block * nf, (end_block + 1) * nf
        n = end_frame - start_frame
        if n == W * nf or start_frame == 0:
            x = torch.cat([noisy_cache[b] for b in range(start_block, end_block)]
                          + [block_noise(end_block, 0, shape)], dim=2)
        else:
            x = torch.cat([noisy_cache[b] for b in range(start_block, end_block + 1)], dim=2)
        if n == W * nf:
            ts = shared
        elif start_frame == 0:
            ts = shared[:, -n:]
        elif end_frame == num_frames:
            ts = shared[:, :n]
        else:
            raise AssertionError("window in the middle that is not full")
        v = run.forward(x, ts, start_frame, cond)
        sigma = torch.tensor([sigmas[step_of(t)] for t in ts[0]], dtype=torch.float64).view(1, 1, n, 1, 1)
        x0 = (x.double() - sigma * v.double()).float()
        for j, b in enumerate(range(start_block, end_block + 1)):
            part = x0[:, :, j * nf:(j + 1) * nf]
            output[b] = part
            i = step_of(ts[0, j * nf])
            if i == W - 1:
                continue
            nxt = sigmas[i + 1]
            noisy_cache[b] = (1 - nxt) * part + nxt * block_noise(b, i + 1, shape)
        run.forward(x0[:, :, :nf], torch.zeros(batch, nf), start_frame, cond, updating_cache=True)
    return torch.cat([output[b] for b in range(num_blocks)], dim=2)


NUM_BLOCKS = 11  # windows with first block >= 7 (context pass without the anchor) and the buffer roll


def _reference(rerotate_anchor=True):
    adapter = load_tiny_wan(seed=3)
    info = adapter.info
    reference = load_tiny_wan(seed=3).detach()
    shape = (info.latent_channels, 3, info.latent_height, info.latent_width)
    run = RollingRun(reference, 2, info.tokens_per_frame, NUM_BLOCKS * 3 + 3,
                     (info.latent_height, info.latent_width), rerotate_anchor)
    cond = adapter.encode_prompts(list(PROMPTS))
    sampler = get_recipe("rolling-forcing").sampler
    return original_rolling_forcing(run, NUM_BLOCKS, cond, sampler.timesteps(), sampler.sigmas(), shape)


def _recipe_rollout(user_policies=()):
    recipe = get_recipe("rolling-forcing")
    specs = merge_policy_specs(recipe, list(user_policies))
    config = RolloutConfig(num_chunks=NUM_BLOCKS, prompts=PROMPTS, seeds=SEEDS, recipe=recipe)
    session = Session(load_tiny_wan(seed=3), build_policies(*specs), config)
    return session.run(), session


@pytest.fixture(scope="module")
def recipe_result():
    return _recipe_rollout()


def test_rolling_forcing_sampler_and_defaults():
    recipe = get_recipe("rolling-forcing")
    assert recipe.sampler.timesteps() == pytest.approx([1000.0, 952.381, 882.353, 769.231, 555.556], abs=1e-3)
    assert recipe.rope_mode == "raw" and recipe.rolling.anchor_frames == 3
    assert recipe.policies == ("attention-sink:frames=3", "sliding-window:frames=18")
    # n_work: full window -> 1 block; 4 blocks -> 2; 1 block -> 5; never more than f - 1
    assert [recipe.rolling.working_blocks(f, k, 3) for f, k in ((9, 5), (9, 4), (9, 1), (1, 5), (2, 1))] == [
        1, 2, 5, 0, 1]


def test_rolling_forcing_recipe_equals_the_original_loop(recipe_result):
    result, session = recipe_result
    expected = _reference()
    assert result.latents.shape == expected.shape
    diff = (result.latents - expected).abs().max().item()
    assert diff <= TOL, diff
    assert [r["chunk"] for r in result.trace] == list(range(NUM_BLOCKS))
    assert result.trace[-1]["window_blocks"] == [NUM_BLOCKS - 1, NUM_BLOCKS - 1]
    # sink + 6 most recent blocks stay resident: 21 frames
    assert session.cache.max_length == 21 * session.model.tokens_per_frame


def test_anchor_re_rotation_matters(recipe_result):
    """The ablation: the anchor kept at positions 0..2 gives a different video (the test above would fail)."""
    result, _ = recipe_result
    ablated = _reference(rerotate_anchor=False)
    diff = (result.latents - ablated).abs().max().item()
    assert diff > 1e-3, diff
    # blocks 0..2 do not depend on it: windows with first block f <= 2 put the anchor at 3f - 3*n_work - 3 = 0
    assert (result.latents[:, :, :9] - ablated[:, :, :9]).abs().max().item() <= TOL
    assert (result.latents[:, :, 9:12] - ablated[:, :, 9:12]).abs().max().item() > 1e-3


def test_rolling_forcing_composes_with_tokentrim():
    """TokenTrim scores the final block's x0 (``summary_at=final``: ``candidate_ready`` before its context
    pass); a prune re-runs the window with the same inputs and noise."""
    result, session = _recipe_rollout(("tokentrim:p=0.2,lambda=0,warmup=2,summary_at=final",))
    assert result.latents.shape[2] == NUM_BLOCKS * 3
    assert bool(torch.isfinite(result.latents).all())
    assert [r["chunk"] for r in result.trace] == list(range(NUM_BLOCKS))
    assert any(r["retries"] > 0 for r in result.trace), [r["retries"] for r in result.trace]
    # the anchor (the sink) survives every prune
    view = session.cache.view()
    assert bool(((view.frame < 3) & view.valid).sum(dim=1).eq(3 * session.model.tokens_per_frame).all())


def test_rolling_window_refuses_prompt_switches_and_absolute_rope():
    from cachepolicy.engine import PromptSwitch
    from cachepolicy.errors import RolloutConfigError

    config = RolloutConfig(num_chunks=3, prompts=["a"], seeds=[0], recipe=get_recipe("rolling-forcing"),
                           prompt_switches=[PromptSwitch(1, "b")])
    with pytest.raises(RolloutConfigError, match="prompt switches are not supported"):
        Session(load_tiny_wan(seed=3), build_policies("attention-sink:frames=3"), config).run()
    with pytest.raises(ParameterError, match="needs rope_mode='raw'"):
        attrs.evolve(get_recipe("rolling-forcing"), rope_mode="absolute")
    with pytest.raises(ParameterError, match="cannot be combined"):
        Recipe(name="x", summary="", rolling=get_recipe("rolling-forcing").rolling, rope_mode="raw",
               restart=get_recipe("causvid").restart)


def test_rolling_window_guidance_zero_is_the_empty_prompt_run():
    """Classifier-free guidance through the rolling window: with ``w = 0`` only the unconditional branch
    counts, so the run equals an unguided run on empty prompts, TokenTrim's prunes and restarts included
    (its prunes reach the unconditional branch's cache too)."""
    recipe = get_recipe("rolling-forcing")
    specs = merge_policy_specs(recipe, ["tokentrim:p=0.2,lambda=0,warmup=2,summary_at=final"])
    runs = []
    for prompts, guidance in ((PROMPTS, 0.0), (("", ""), 1.0)):
        config = RolloutConfig(num_chunks=NUM_BLOCKS, prompts=prompts, seeds=SEEDS, recipe=recipe,
                               sampler=attrs.evolve(recipe.sampler, guidance=guidance))
        session = Session(load_tiny_wan(seed=3), build_policies(*specs), config)
        runs.append((session.run(), session))
    (guided, session), (empty, _) = runs
    assert any(r["retries"] > 0 for r in empty.trace), [r["retries"] for r in empty.trace]
    assert [r["retries"] for r in guided.trace] == [r["retries"] for r in empty.trace]
    assert torch.allclose(guided.latents, empty.latents, atol=1e-5)
    assert session.cache.branches == 2 and not session.cache.split
