"""A scripted model adapter for hand-computed policy tests: its x0-prediction is whatever the test says.

By default one latent frame per chunk, one channel, a ``1 x N`` latent with patch 1, so the token grid is the
latent itself (``D = 1``) and every drift is an absolute difference a test can compute by hand; the
denoising recipe is one un-warped step at sigma 1. ``frames`` and ``channels`` widen the chunk (``F``
frames, ``D = channels`` values per token, still patch 1), and ``steps`` gives an un-warped multi-step
sampler (sigma ``t / 1000``) whose x0 may differ per step. The model's output is
``v = (x - target) / sigma``, so the engine's ``x0 = x - sigma * v`` is the target (up to float32 rounding,
~1e-7).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cachepolicy.cache import KVCache
from cachepolicy.layers import ForwardCall
from cachepolicy.models import ModelAdapter, ModelInfo, Sampler

ONE_STEP = Sampler(denoising_steps=(1000.0,), warp=False)

#: ``script(sample, chunk, pruned)`` or ``script(sample, chunk, pruned, step)`` -> the chunk's x0: N values
#: (one frame, one channel) or nested ``[C][F][N]`` values; ``pruned`` is True when the sample's cache holds
#: fewer tokens than were committed (something was pruned), ``step`` the denoising step's index.
Script = Callable[..., Any]


class ScriptedAdapter(ModelAdapter):
    """x0 of chunk ``c`` for sample ``b`` is ``script(b, c, pruned[, step])``; K/V are never read."""

    def __init__(self, script: Script, num_tokens: int, *, grid: bool = True, frames: int = 1, channels: int = 1,
                 steps: Sequence[float] | None = None) -> None:
        self.script = script
        self.grid = grid
        self.frames, self.channels = frames, channels
        self.with_step = len(inspect.signature(script).parameters) == 4
        sampler = ONE_STEP if steps is None else Sampler(denoising_steps=tuple(steps), warp=False)
        self.info = ModelInfo(
            name="scripted", adapter="scripted", frames_per_chunk=frames, latent_channels=channels, latent_height=1,
            latent_width=num_tokens, token_rows=1, token_cols=num_tokens, num_layers=1, num_heads=1, head_dim=1,
            max_frames=1000, device="cpu", dtype="float32", sampler=sampler,
        )
        self.committed: list[int] = []  # tokens committed so far per sample
        self.calls: list[tuple[int, float, bool]] = []  # (chunk, timestep, commit) of every forward

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        return None

    def new_cache(self, batch_size: int, *, rope_mode: str = "absolute", branches: int = 1) -> KVCache:
        self.committed = [0] * batch_size
        return KVCache(1, batch_size, 1, 1, self.info.token_cols, rope_mode=rope_mode, branches=branches)

    def check_rollout(self, num_frames: int, batch_size: int) -> None:
        return None

    def _target(self, sample: int, chunk: int, pruned: bool, step: int) -> torch.Tensor:
        args = (sample, chunk, pruned, step) if self.with_step else (sample, chunk, pruned)
        value = torch.tensor(self.script(*args), dtype=torch.float32)
        return value.reshape(self.channels, self.frames, 1, self.info.token_cols)

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor, call: ForwardCall, cache: KVCache,
                conditioning: Any) -> torch.Tensor:
        batch = latent.shape[0]
        timestep = float(timesteps[0, 0])
        self.calls.append((call.chunk, timestep, call.context))
        cache.reserve(self.info.tokens_per_chunk)  # room for the provisional slot, as a real adapter makes
        if call.context:  # the engine commits the chunk right after
            self.committed = [n + self.info.tokens_per_chunk for n in self.committed]
            return torch.zeros_like(latent)
        target = torch.stack([self._target(b, call.chunk, cache.lengths[b] < self.committed[b], call.step)
                              for b in range(batch)])
        return (latent - target) / (timestep / 1000.0)  # v, so that x0 = x - sigma * v = target

    def token_grid(self, latent: torch.Tensor) -> torch.Tensor:
        if not self.grid:
            return super().token_grid(latent)
        batch, channels, frames, height, width = latent.shape
        return latent.permute(0, 2, 3, 4, 1).reshape(batch, frames, height * width, channels)
