"""SkyReels-V2 adapter: a KV cache around a stock ``diffusers.SkyReelsV2Transformer3DModel`` (no fork).

SkyReels-V2 (arXiv 2504.13074) is a Wan2.1-architecture transformer trained with *diffusion forcing*:
every latent frame carries its own timestep, and frames are grouped into causal blocks of
``num_frame_per_block`` frames (diffusers: ``causal_block_size``, set with ``_set_ar_attention``). The
adapter runs it chunk by chunk against the project's :class:`~cachepolicy.cache.KVCache`:

* Self-attention: every ``blocks[i].attn1`` processor is swapped for
  :class:`CachedSkyReelsAttnProcessor`. SkyReels' self-attention module is Wan's (same projections, RMS norms
  across heads, interleaved-pair RoPE), so it is the Wan adapter's cached processor with diffusers'
  ``SkyReelsV2AttnProcessor`` as the stock fallback: queries, keys and values computed as diffusers does,
  rotated at the chunk's absolute frame positions, keys (after RoPE) and values written into the chunk's
  provisional cache slot, attention to ``[resident context, own chunk]``. Inside the chunk the stock
  causal-block structure is kept: with ``1 < num_frame_per_block < frames_per_chunk`` a frame sees the
  blocks of its chunk up to its own; with ``num_frame_per_block`` equal to the chunk (the default) or 1
  (stock diffusers builds no mask then) the chunk attends to itself bidirectionally.
* RoPE: the Wan adapter's ``diffusers.hooks.ModelHook`` on ``model.rope`` returns the tables of the chunk's
  absolute frames (``rope_start .. rope_start + F - 1``), indexed out of the module's own
  ``freqs_cos``/``freqs_sin`` buffers, bit-identical to the rows of a full forward.
* Timesteps: always the diffusion-forcing path (``enable_diffusion_forcing=True``, ``timestep`` ``[B, F]``,
  one per latent frame), so a chunk whose frames sit at different noise levels is modulated per frame.
* fps: models with ``inject_sample_info`` add an fps embedding (index 0 for 16 fps, 1 for 24 fps). It is
  passed as a one-element list, which broadcasts over the batch (diffusers' own pipeline passes one entry
  per sample, which only works for a batch of one under diffusion forcing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import SkyReelsV2Transformer3DModel
from diffusers.hooks import HookRegistry
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor

from cachepolicy.adapters.wan.adapter import (
    CachedWanAttnProcessor,
    AbsoluteRopeHook,
    ForwardState,
    block_causal_mask,
    raw_key_rotary,
    cast_model,
)
from cachepolicy.cache import KVCache, metadata_for_chunk
from cachepolicy.errors import CacheShapeError, ParameterError, RolloutConfigError
from cachepolicy.models import ModelAdapter, ModelInfo, Sampler

ROPE_HOOK_NAME = "cachepolicy_skyreels_absolute_rope"

#: SkyReels' fps conditioning: the embedding index of each supported frame rate (its pipeline's mapping)
FPS_INDEX = {16: 0, 24: 1}


class CachedSkyReelsAttnProcessor(CachedWanAttnProcessor):
    """Self-attention of one SkyReels-V2 block against the KV cache (keys stored after RoPE).

    ``SkyReelsV2Attention`` self-attention is ``WanAttention``'s (same projections, fused or not, RMS norms
    across heads, interleaved-pair RoPE), so the Wan processor's cached path is reused unchanged; outside an
    adapter forward it falls back to diffusers' ``SkyReelsV2AttnProcessor``. The block's own mask is ignored:
    the adapter puts the same in-chunk structure, next to the cached context, into the state's mask.
    """

    def __init__(self, layer: int, state: ForwardState) -> None:
        super().__init__(layer, state)
        self._stock = SkyReelsV2AttnProcessor()


class _FixedMaskProcessor(SkyReelsV2AttnProcessor):
    """Stock ``SkyReelsV2AttnProcessor`` with a fixed self-attention mask instead of the block's."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def fps_argument(model: SkyReelsV2Transformer3DModel, fps: int) -> list[int] | None:
    """The ``fps`` argument of a diffusion-forcing forward: ``[index]`` for models with ``inject_sample_info``."""
    return [FPS_INDEX[fps]] if model.config.inject_sample_info else None


def masked_forward(model: SkyReelsV2Transformer3DModel, hidden_states: torch.Tensor, timestep: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                   fps: int = 24) -> torch.Tensor:
    """One stock diffusion-forcing forward (``timestep`` ``[B, F]``) with a self-attention mask.

    ``attention_mask`` (bool ``[B or 1, 1, L, L]``, True = may attend) replaces the model's own causal-block
    mask in every ``blocks[i].attn1``; None keeps the stock behaviour (the model's own mask). Processors are
    restored afterwards. The equivalence oracle of the tests.
    """
    originals = [block.attn1.processor for block in model.blocks]
    try:
        if attention_mask is not None:
            for block in model.blocks:
                block.attn1.set_processor(_FixedMaskProcessor(attention_mask))
        with torch.no_grad():
            return model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                         enable_diffusion_forcing=True, fps=fps_argument(model, fps), return_dict=False)[0]
    finally:
        for block, processor in zip(model.blocks, originals):
            block.attn1.set_processor(processor)


class SkyReelsV2Adapter(ModelAdapter):
    """KV-cached autoregressive rollouts of any text-to-video ``SkyReelsV2Transformer3DModel`` config.

    Args:
        model: the stock diffusers model (its ``attn1`` processors are swapped; see :meth:`detach`).
        name: model name recorded in outputs.
        latent_size: ``(H, W)`` latent pixels per frame (SkyReels-V2 540P: ``(68, 120)``).
        text_encoder: callable ``prompts -> [B, L, text_dim]``.
        frames_per_chunk: latent frames per chunk; default the model's ``num_frame_per_block`` when it is above
            1, else 5 (SkyReels' recommended ``causal_block_size``). A multiple of ``num_frame_per_block``.
        fps: 16 or 24, the frame rate fed to models with ``inject_sample_info`` (ignored otherwise).
        sampler: the model's default denoising recipe.
    """

    def __init__(self, model: SkyReelsV2Transformer3DModel, *, name: str, latent_size: tuple[int, int],
                 text_encoder: Any, frames_per_chunk: int | None = None, fps: int = 24,
                 sampler: Sampler | None = None) -> None:
        if not isinstance(model, SkyReelsV2Transformer3DModel):
            raise ParameterError(
                f"SkyReelsV2Adapter wraps a diffusers SkyReelsV2Transformer3DModel, got {type(model).__name__}"
            )
        config = model.config
        p_t, p_h, p_w = config.patch_size
        height, width = latent_size
        if p_t != 1:
            raise ParameterError(f"patch_size {tuple(config.patch_size)}: chunked rollouts need a temporal patch of 1")
        if height % p_h or width % p_w:
            raise ParameterError(f"latent size {height}x{width} is not divisible by the patch size {p_h}x{p_w}")
        if config.added_kv_proj_dim is not None or config.image_dim is not None:
            raise ParameterError("image-conditioned SkyReels-V2 models (I2V) are not supported yet")
        if fps not in FPS_INDEX:
            raise ParameterError(f"fps={fps!r}: SkyReels-V2 knows {sorted(FPS_INDEX)} fps")
        block = config.num_frame_per_block
        if frames_per_chunk is None:
            frames_per_chunk = block if block > 1 else 5
        if block > 1 and frames_per_chunk % block:
            raise ParameterError(
                f"frames_per_chunk={frames_per_chunk} is not a multiple of the model's causal block of {block} "
                f"frames (num_frame_per_block); set causal_block_size= to a divisor"
            )
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.fps = fps
        param = model.patch_embedding.weight
        self.info = ModelInfo(
            name=name, adapter="skyreels", frames_per_chunk=frames_per_chunk,
            latent_channels=config.in_channels, latent_height=height, latent_width=width,
            token_rows=height // p_h, token_cols=width // p_w, num_layers=config.num_layers,
            num_heads=config.num_attention_heads, head_dim=config.attention_head_dim,
            max_frames=config.rope_max_seq_len, device=str(param.device),
            dtype=str(param.dtype).removeprefix("torch."), sampler=sampler or Sampler(),
        )
        self._state = ForwardState()
        self._original_processors = [block.attn1.processor for block in model.blocks]
        for layer, blk in enumerate(model.blocks):
            blk.attn1.set_processor(CachedSkyReelsAttnProcessor(layer, self._state))
        registry = HookRegistry.check_if_exists_or_initialize(model.rope)
        registry.register_hook(AbsoluteRopeHook(self._state), ROPE_HOOK_NAME)
        rope = model.rope
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        self._cos = rope.freqs_cos.split(split, dim=1)
        self._sin = rope.freqs_sin.split(split, dim=1)

    def detach(self) -> SkyReelsV2Transformer3DModel:
        """Restore the model's stock processors and RoPE; returns the model."""
        for blk, processor in zip(self.model.blocks, self._original_processors):
            blk.attn1.set_processor(processor)
        HookRegistry.check_if_exists_or_initialize(self.model.rope).remove_hook(ROPE_HOOK_NAME, recurse=False)
        return self.model

    # ------------------------------------------------------------------------------------- contract
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        param = self.model.patch_embedding.weight
        return self.text_encoder(list(prompts)).to(device=param.device, dtype=param.dtype)

    def new_cache(self, batch_size: int, *, rope_mode: str = "absolute") -> KVCache:
        info = self.info
        param = self.model.patch_embedding.weight
        return KVCache(info.num_layers, batch_size, info.num_heads, info.head_dim, info.token_cols,
                       device=param.device, dtype=param.dtype, capacity=2 * info.tokens_per_chunk,
                       rope_mode=rope_mode)

    def check_rollout(self, num_frames: int, batch_size: int) -> None:
        limit = self.info.max_frames
        if num_frames > limit or max(self.info.token_rows, self.info.token_cols) > limit:
            raise RolloutConfigError(
                f"a rollout of {num_frames} latent frames on a {self.info.token_rows}x{self.info.token_cols} token "
                f"grid passes the model's rope_max_seq_len={limit}: generate at most "
                f"{limit // self.info.frames_per_chunk} chunks"
            )

    def rotary(self, rope_start: int, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables ``[1, F * rows * cols, 1, head_dim]`` of frames ``rope_start .. rope_start + F - 1``."""
        rows, cols = self.info.token_rows, self.info.token_cols
        device = self._cos[0].device
        f = torch.arange(rope_start, rope_start + num_frames, device=device).repeat_interleave(rows * cols)
        h = torch.arange(rows, device=device).repeat_interleave(cols).repeat(num_frames)
        w = torch.arange(cols, device=device).repeat(num_frames * rows)
        return tuple(torch.cat([t[f], hh[h], ww[w]], dim=-1)[None, :, None]  # type: ignore[return-value]
                     for t, hh, ww in (self._cos, self._sin))

    def chunk_mask(self, num_frames: int, device: torch.device | str) -> torch.Tensor | None:
        """Bool ``[1, 1, n, n]`` in-chunk mask (stock causal blocks), or None when the chunk is bidirectional."""
        block = self.model.config.num_frame_per_block
        if block <= 1 or block >= num_frames:
            return None
        return block_causal_mask(block, num_frames, self.info.tokens_per_frame, device=device)

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor, frame_start: int, chunk: int,
                cache: KVCache, conditioning: torch.Tensor, commit: bool, *,
                rope_start: int | None = None, visible: torch.Tensor | None = None,
                rope_positions: torch.Tensor | None = None) -> torch.Tensor:
        info = self.info
        rope_start = frame_start if rope_start is None else rope_start
        num_frames = latent.shape[2]
        cache.reserve(num_frames * info.tokens_per_frame)
        out = self._run(latent, timesteps, rope_start, cache, conditioning,
                        cache.key_mask(num_frames * info.tokens_per_frame, visible), rope_positions=rope_positions)
        if commit:
            cache.commit(metadata_for_chunk(latent.shape[0], frame_start, num_frames, info.token_rows,
                                            info.token_cols, chunk, rope_start=rope_start, device=cache.device))
        return out

    def reencode(self, latent: torch.Tensor, timesteps: torch.Tensor, frame_start: int, cache: KVCache,
                 conditioning: torch.Tensor, *, rope_start: int | None = None) -> int:
        """LongLive's KV re-cache: new K/V for resident frames ``frame_start ..`` (see the contract); inside
        the re-encoded frames the stock causal-block structure applies, as in :meth:`forward`."""
        rope_start = frame_start if rope_start is None else rope_start
        num_frames = latent.shape[2]
        num_tokens = num_frames * self.info.tokens_per_frame
        cache.reserve(num_tokens)
        self._run(latent, timesteps, rope_start, cache, conditioning,
                  cache.reencode_mask(num_tokens, frame_start, num_frames))
        return cache.replace_frames(frame_start, num_frames, self.info.tokens_per_frame)

    def _run(self, latent: torch.Tensor, timesteps: torch.Tensor, rope_start: int, cache: KVCache,
             conditioning: torch.Tensor, key_mask: torch.Tensor | None, *,
             rope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """One model call on ``latent`` whose K/V go to the provisional slot; ``key_mask`` (``[B, 1, 1, S + n]``
        or None) says which cached keys each sample sees."""
        info = self.info
        batch, channels, num_frames, height, width = latent.shape
        if (channels, height, width) != (info.latent_channels, info.latent_height, info.latent_width):
            raise CacheShapeError(f"latent of shape {tuple(latent.shape)} does not match the model's "
                                  f"[B, {info.latent_channels}, F, {info.latent_height}, {info.latent_width}]")
        if batch != cache.batch_size or conditioning.shape[0] != batch or tuple(timesteps.shape) != (batch, num_frames):
            raise CacheShapeError(
                f"latent {tuple(latent.shape)}, timesteps {tuple(timesteps.shape)} (want [B, F]), conditioning for "
                f"{conditioning.shape[0]} samples and a cache of {cache.batch_size} samples do not agree"
            )
        block = self.model.config.num_frame_per_block
        if block > 1 and num_frames % block:
            raise CacheShapeError(f"a chunk of {num_frames} frames is not a whole number of causal blocks of {block}")
        if rope_start < 0 or rope_start + num_frames > info.max_frames:
            raise RolloutConfigError(f"RoPE frame positions {rope_start}..{rope_start + num_frames - 1} are outside "
                                     f"the model's table of {info.max_frames} frames")
        num_tokens = num_frames * info.tokens_per_frame
        state = self._state
        state.cache = cache
        state.num_tokens = num_tokens
        state.write_index = cache.write_index(num_tokens)
        own = self.chunk_mask(num_frames, cache.device)
        if own is not None:  # cached context as key_mask says, causal blocks inside the chunk
            context = torch.ones(1, 1, num_tokens, cache.max_length, dtype=torch.bool, device=cache.device)
            full = torch.cat([context, own], dim=-1)
            key_mask = full if key_mask is None else full & key_mask
        state.key_mask = key_mask
        state.rotary = self.rotary(rope_start, num_frames)
        state.key_rotary = raw_key_rotary(cache, num_frames, rope_start, info.token_rows, info.token_cols,
                                          self._cos, self._sin, rope_positions, info.max_frames)
        try:
            return masked_forward(self.model, latent, timesteps.to(device=latent.device, dtype=torch.float32),
                                  conditioning, None, fps=self.fps)
        finally:
            state.clear()

    def token_grid(self, latent: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, F, N, C * p_h * p_w]`` (row-major token grid, like Wan)."""
        _, p_h, p_w = self.model.config.patch_size
        rows, cols = self.info.token_rows, self.info.token_cols
        grid = latent.unflatten(4, (cols, p_w)).unflatten(3, (rows, p_h))  # B, C, F, rows, p_h, cols, p_w
        return grid.permute(0, 2, 3, 5, 1, 4, 6).flatten(4).flatten(2, 3)


# ------------------------------------------------------------------------------------------ loaders
def _wrap(model: SkyReelsV2Transformer3DModel, *, name: str, latent_size: tuple[int, int], text_encoder: Any,
          frames_per_chunk: int | None, causal_block_size: int | None, fps: Any,
          sampler: Sampler | None) -> SkyReelsV2Adapter:
    if causal_block_size is not None:
        if not isinstance(causal_block_size, int) or causal_block_size < 1:
            raise ParameterError(f"causal_block_size={causal_block_size!r}: expected a positive integer")
        model._set_ar_attention(causal_block_size)  # diffusers' own switch (what its DF pipeline calls)
    return SkyReelsV2Adapter(model, name=name, latent_size=latent_size, text_encoder=text_encoder,
                             frames_per_chunk=frames_per_chunk, fps=fps, sampler=sampler)


#: the tiny model: tiny-wan's sizes plus SkyReels' diffusion-forcing extras (fps embedding, 3-frame blocks)
TINY_EXTRA: dict[str, Any] = {"inject_sample_info": True, "num_frame_per_block": 3}


def tiny_skyreels_model(seed: int = 0, **overrides: Any) -> SkyReelsV2Transformer3DModel:
    """A random ``SkyReelsV2Transformer3DModel`` with tiny-wan's config (every parameter randomised)."""
    from cachepolicy.adapters.wan.tiny import TINY_CONFIG, randomize_

    known = {**TINY_CONFIG, **TINY_EXTRA}
    unknown = set(overrides) - set(known)
    if unknown:
        raise ParameterError(f"unknown tiny-skyreels config keys {sorted(unknown)}; known: {sorted(known)}")
    torch.manual_seed(seed)  # diffusers' own init (replaced right after) must not depend on global state
    return randomize_(SkyReelsV2Transformer3DModel(**{**known, **overrides}), seed)


def load_tiny_skyreels(seed: int = 0, *, device: str = "cpu", dtype: str = "float32",
                       latent_size: Any = (8, 8), frames_per_chunk: int | None = None,
                       causal_block_size: int | None = None, fps: int = 24, sampler: Sampler | None = None,
                       **config_overrides: Any) -> SkyReelsV2Adapter:
    """The ``tiny-skyreels`` model: random weights from ``seed``, 8x8 latent, causal blocks of 3 frames."""
    from cachepolicy.adapters.wan.checkpoints import parse_latent_size
    from cachepolicy.adapters.wan.tiny import HashedWordEncoder

    model = cast_model(tiny_skyreels_model(seed, **config_overrides), device, dtype)
    return _wrap(model, name="tiny-skyreels", latent_size=parse_latent_size(latent_size),
                 text_encoder=HashedWordEncoder(model.config.text_dim), frames_per_chunk=frames_per_chunk,
                 causal_block_size=causal_block_size, fps=fps, sampler=sampler)


def load_diffusers_skyreels(path: str | None = None, *, device: str = "cpu", dtype: str = "float32",
                            latent_size: Any = (68, 120), frames_per_chunk: int | None = None,
                            causal_block_size: int | None = None, fps: int = 24, text_encoder: Any = None,
                            sampler: Sampler | None = None, **unknown: Any) -> SkyReelsV2Adapter:
    """A ``SkyReelsV2Transformer3DModel`` saved in diffusers format (``path``: model or pipeline folder), loaded
    strictly: missing, unexpected or mis-shaped keys raise :class:`~cachepolicy.errors.CheckpointError`."""
    from cachepolicy.adapters.wan.checkpoints import default_text_encoder, load_diffusers_folder, parse_latent_size

    if unknown:
        raise ParameterError(f"model 'skyreels-diffusers' has no options {sorted(unknown)}")
    if path is None:
        raise ParameterError("model 'skyreels-diffusers' needs path=DIR (a folder with config.json and weights)")
    model = load_diffusers_folder(str(path), dtype=dtype, device=device, model_class=SkyReelsV2Transformer3DModel)
    encoder = text_encoder or default_text_encoder(model.config.text_dim, "skyreels-diffusers")
    return _wrap(model, name=str(path), latent_size=parse_latent_size(latent_size), text_encoder=encoder,
                 frames_per_chunk=frames_per_chunk, causal_block_size=causal_block_size, fps=fps, sampler=sampler)
