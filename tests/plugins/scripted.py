"""A scripted model adapter for hand-computed policy tests: its x0-prediction is whatever the test says.

One latent frame per chunk, one channel, a ``1 x N`` latent with patch 1, so the token grid is the latent
itself (``D = 1``) and every drift is an absolute difference a test can compute by hand. The denoising
recipe is one un-warped step at sigma 1, so the model's output ``v = x - target`` gives ``x0 = target``
(up to float32 rounding, ~1e-7).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cachepolicy.cache import KVCache
from cachepolicy.layers import ForwardCall
from cachepolicy.models import ModelAdapter, ModelInfo, Sampler

ONE_STEP = Sampler(denoising_steps=(1000.0,), warp=False)

#: ``script(sample, chunk, pruned)`` -> the chunk's x0 as a list of N values; ``pruned`` is True when the
#: sample's cache holds fewer tokens than were committed (something was pruned).
Script = Callable[[int, int, bool], Sequence[float]]


class ScriptedAdapter(ModelAdapter):
    """x0 of chunk ``c`` for sample ``b`` is ``script(b, c, pruned)``; K/V are never read."""

    def __init__(self, script: Script, num_tokens: int, *, grid: bool = True) -> None:
        self.script = script
        self.grid = grid
        self.info = ModelInfo(
            name="scripted", adapter="scripted", frames_per_chunk=1, latent_channels=1, latent_height=1,
            latent_width=num_tokens, token_rows=1, token_cols=num_tokens, num_layers=1, num_heads=1, head_dim=1,
            max_frames=1000, device="cpu", dtype="float32", sampler=ONE_STEP,
        )
        self.committed: list[int] = []  # tokens committed so far per sample

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        return None

    def new_cache(self, batch_size: int, *, rope_mode: str = "absolute", branches: int = 1) -> KVCache:
        self.committed = [0] * batch_size
        return KVCache(1, batch_size, 1, 1, self.info.token_cols, rope_mode=rope_mode, branches=branches)

    def check_rollout(self, num_frames: int, batch_size: int) -> None:
        return None

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor, call: ForwardCall, cache: KVCache,
                conditioning: Any) -> torch.Tensor:
        batch = latent.shape[0]
        cache.reserve(self.info.tokens_per_chunk)  # room for the provisional slot, as a real adapter makes
        if call.context:  # the engine commits the chunk right after
            self.committed = [n + self.info.token_cols for n in self.committed]
            return torch.zeros_like(latent)
        target = torch.tensor([list(self.script(b, call.chunk, cache.lengths[b] < self.committed[b]))
                               for b in range(batch)], dtype=torch.float32).view(batch, 1, 1, 1, -1)
        return latent - target  # v, so that x0 = x - 1.0 * v = target

    def token_grid(self, latent: torch.Tensor) -> torch.Tensor:
        if not self.grid:
            return super().token_grid(latent)
        batch, channels, frames, height, width = latent.shape
        return latent.permute(0, 2, 3, 4, 1).reshape(batch, frames, height * width, channels)
