"""Pieces shared by the reimplementations of the original systems' loops (test oracles).

Written from the originals' documented semantics (docs "Recipes"), independent of ``cachepolicy``'s engine and
cache: a physical per-layer K/V buffer with the two indices Self Forcing, LongLive and Rolling Forcing keep,
and interleaved-pair RoPE (``causal_rope_apply``) applied with diffusers' tables.
"""

from __future__ import annotations

import torch


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
