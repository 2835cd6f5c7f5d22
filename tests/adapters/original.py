"""Reimplementations of the original systems' loops on a stock diffusers model (test oracles, and the reference
side of ``benchmarks/vs_self_forcing.py``).

Written from the originals' documented semantics (docs "Recipes"), independent of ``cachepolicy``'s engine and
cache: a physical per-layer K/V buffer with the two indices Self Forcing, LongLive and Rolling Forcing keep,
interleaved-pair RoPE (``causal_rope_apply``) applied with diffusers' tables, stock diffusers modules for
everything else (cross-attention included, unless ``cross_cache``: Self Forcing's ``crossattn_cache``, the
prompt's keys/values computed on the first call and reused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class OriginalBuffer:
    """One layer's K/V buffer ``[B, capacity, H, D]`` and its ``global_end_index`` / ``local_end_index``
    (tokens)."""

    def __init__(self, batch, capacity, heads, dim):
        self.k = torch.zeros(batch, capacity, heads, dim)
        self.v = torch.zeros(batch, capacity, heads, dim)
        self.global_end = 0
        self.local_end = 0


def rotate(x, cos, sin):
    """Interleaved-pair RoPE of ``x`` ``[B, L, H, D]`` with tables ``[1, L, 1, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out


def project_qkv(attn, hidden_states):
    """Queries, keys and values ``[B, L, H, D]`` of a stock Wan self-attention module, before RoPE."""
    q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    return q, k, v


class OriginalAttention:
    """Self-attention of a stock Wan block with the original systems' cache arithmetic (tokens)."""

    def __init__(self, layer, run):
        self.layer, self.run = layer, run

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        run = self.run
        q, k, v = project_qkv(attn, hidden_states)
        cos, sin = rotary_emb  # absolute positions of this call's frames, [1, L, 1, D]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        cache = run.caches[self.layer]
        num_new = k.shape[1]
        current_start = run.current_start
        current_end = current_start + num_new
        if run.system == "causvid":  # no indices, no eviction
            cache.k[:, current_start:current_end] = k
            cache.v[:, current_start:current_end] = v
            keys, values = cache.k[:, :current_end], cache.v[:, :current_end]
        else:  # Self Forcing causal_model.py / LongLive causal_model.py
            size, sink = run.cache_tokens, run.sink_tokens
            recompute = current_end <= cache.global_end and current_start > 0
            if run.window_tokens != -1 and current_end > cache.global_end and num_new + cache.local_end > size:
                evicted = num_new + cache.local_end - size
                rolled = cache.local_end - evicted - sink
                cache.k[:, sink:sink + rolled] = cache.k[:, sink + evicted:sink + evicted + rolled].clone()
                cache.v[:, sink:sink + rolled] = cache.v[:, sink + evicted:sink + evicted + rolled].clone()
                local_end = cache.local_end + current_end - cache.global_end - evicted
            else:
                local_end = cache.local_end + current_end - cache.global_end
            local_start = local_end - num_new
            write_start = max(local_start, sink) if recompute else local_start
            cache.k[:, write_start:local_end] = k[:, write_start - local_start:]
            cache.v[:, write_start:local_end] = v[:, write_start - local_start:]
            if sink > 0:
                budget = run.window_tokens - sink
                start = max(sink, local_end - budget)
                keys = torch.cat([cache.k[:, :sink], cache.k[:, start:local_end]], dim=1)
                values = torch.cat([cache.v[:, :sink], cache.v[:, start:local_end]], dim=1)
            else:
                start = 0 if run.window_tokens == -1 else max(0, local_end - run.window_tokens)
                keys, values = cache.k[:, start:local_end], cache.v[:, start:local_end]
            if not recompute:
                cache.global_end = current_end
            cache.local_end = local_end
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class OriginalRun:
    """A stock diffusers model driven like the original repositories drive theirs."""

    def __init__(self, model, system, batch, *, window_frames=-1, sink_frames=0, tokens_per_frame, total_frames,
                 latent_hw=(8, 8), cross_cache=False):
        self.model, self.system = model, system
        self.cond = None
        self.tokens_per_frame = tokens_per_frame
        self.window_tokens = window_frames * tokens_per_frame if window_frames != -1 else -1
        self.sink_tokens = sink_frames * tokens_per_frame
        capacity_frames = total_frames if window_frames == -1 else window_frames
        self.cache_tokens = capacity_frames * tokens_per_frame
        heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
        self.caches = [OriginalBuffer(batch, self.cache_tokens, heads, dim) for _ in model.blocks]
        for layer, block in enumerate(model.blocks):
            block.attn1.set_processor(OriginalAttention(layer, self))
            if cross_cache:
                block.attn2.set_processor(OriginalCrossAttention(layer, self))
        # absolute RoPE tables of every frame, from diffusers' own rotary module on the full length; each
        # call then gets the slice of its frames (causal_rope_apply's start_frame)
        full = torch.zeros(1, model.config.in_channels, total_frames, *latent_hw)
        stock = model.rope.__dict__.setdefault("stock_forward", model.rope.forward)  # a model driven again
        self.full_cos, self.full_sin = stock(full)
        self.rope = None
        model.rope.forward = lambda hidden_states: self.rope

    def forward(self, latent, timestep, frame_start, cond, rope_frame=None):
        """Model call on frames of ``latent`` [B, C, F, H, W] written at token ``frame_start * tpf``."""
        rope_frame = frame_start if rope_frame is None else rope_frame
        tpf, frames = self.tokens_per_frame, latent.shape[2]
        self.rope = (self.full_cos[:, rope_frame * tpf:(rope_frame + frames) * tpf],
                     self.full_sin[:, rope_frame * tpf:(rope_frame + frames) * tpf])
        self.current_start = frame_start * tpf
        self.cond = cond
        t = torch.full((latent.shape[0],), float(timestep))
        with torch.no_grad():
            return self.model(hidden_states=latent, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]


class OriginalCrossAttention:
    """Self Forcing's cross-attention with its ``crossattn_cache``: the prompt's keys/values computed on the
    first call with a conditioning and reused by every later call."""

    def __init__(self, layer, run):
        self.layer, self.run = layer, run
        self.cached = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.cached is None or self.cached[0] is not self.run.cond:
            k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
            v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            self.cached = (self.run.cond, k, v)
        _, k, v = self.cached
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))
