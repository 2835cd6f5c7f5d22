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

from typing import Any

import attrs
import torch
from diffusers import SkyReelsV2Transformer3DModel
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor

from cachepolicy.adapters.wan.adapter import (
    CachedWanAttnProcessor,
    ForwardState,
    WanAdapter,
    block_causal_mask,
    cast_model,
)
from cachepolicy.errors import CacheShapeError, ParameterError
from cachepolicy.models import Sampler

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


class SkyReelsV2Adapter(WanAdapter):
    """KV-cached autoregressive rollouts of any text-to-video ``SkyReelsV2Transformer3DModel`` config.

    The Wan adapter's machinery (cache reads and writes, absolute or raw RoPE, re-encoding, visibility and
    position overrides) with SkyReels' model call: diffusion-forcing timesteps ``[B, F]``, the fps embedding,
    and its causal blocks inside a chunk.

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

    model_class = SkyReelsV2Transformer3DModel
    family = "skyreels"
    processor_class = CachedSkyReelsAttnProcessor
    rope_hook_name = ROPE_HOOK_NAME

    def __init__(self, model: SkyReelsV2Transformer3DModel, *, name: str, latent_size: tuple[int, int],
                 text_encoder: Any, frames_per_chunk: int | None = None, fps: int = 24,
                 sampler: Sampler | None = None) -> None:
        if fps not in FPS_INDEX:
            raise ParameterError(f"fps={fps!r}: SkyReels-V2 knows {sorted(FPS_INDEX)} fps")
        block = getattr(getattr(model, "config", None), "num_frame_per_block", 1)
        if frames_per_chunk is None:
            frames_per_chunk = block if block > 1 else 5
        if block > 1 and frames_per_chunk % block:
            raise ParameterError(
                f"frames_per_chunk={frames_per_chunk} is not a multiple of the model's causal block of {block} "
                f"frames (num_frame_per_block); set causal_block_size= to a divisor"
            )
        self.fps = fps
        super().__init__(model, name=name, latent_size=latent_size, text_encoder=text_encoder,
                         frames_per_chunk=frames_per_chunk, sampler=sampler)
        # a call of several blocks is block-causal inside (chunk_mask); with a block of 1 it is bidirectional
        self.info = attrs.evolve(self.info, causal_block_frames=block if block > 1 else None)

    def chunk_mask(self, num_frames: int, device: torch.device | str) -> torch.Tensor | None:
        """Bool ``[1, 1, n, n]`` in-chunk mask (stock causal blocks), or None when the chunk is bidirectional."""
        block = self.model.config.num_frame_per_block
        if block > 1 and num_frames % block:
            raise CacheShapeError(f"a chunk of {num_frames} frames is not a whole number of causal blocks of {block}")
        if block <= 1 or block >= num_frames:
            return None
        return block_causal_mask(block, num_frames, self.info.tokens_per_frame, device=device)

    _chunk_mask = chunk_mask

    def _model_call(self, latent: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """SkyReels' diffusion-forcing forward: per-frame timesteps ``[B, F]`` and the fps embedding."""
        return masked_forward(self.model, latent, timesteps.to(device=latent.device, dtype=torch.float32),
                              conditioning, None, fps=self.fps)


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
