"""Wan2.1 adapter: a KV cache around a stock ``diffusers.WanTransformer3DModel`` (no fork).

Semantics (Self Forcing's, see docs "Concepts"):

* The self-attention processor of every block (``blocks[i].attn1``) is swapped for
  :class:`CachedWanAttnProcessor`. It computes queries, keys and values exactly as diffusers'
  ``WanAttnProcessor`` does, writes the chunk's keys (after RoPE) and values into its provisional slot of
  the :class:`~cachepolicy.cache.KVCache` and attends to ``[resident context, own chunk]``.
* RoPE: diffusers' ``WanRotaryPosEmbed`` always starts at frame 0. A ``diffusers.hooks.ModelHook`` on
  ``model.rope`` returns the rotary tables of the chunk's *absolute* frame positions instead, indexed out
  of the module's own ``freqs_cos``/``freqs_sin`` buffers (bit-identical to a full forward). In the
  cache's default ``rope_mode="absolute"`` keys are stored after RoPE, so cached keys keep their absolute
  positions. In ``rope_mode="raw"`` keys are stored before RoPE and every key attended to is rotated on
  read with per-token tables gathered once per forward from (rope position, row, col): resident tokens at
  their ``rope_pos`` (or the positions the forward overrides), the call's own tokens at its positions.
* Timesteps: one per latent frame; a chunk whose frames share one timestep passes a ``(B,)`` timestep,
  otherwise a ``(B, L)`` per-token timestep (each frame's value repeated over its tokens), which diffusers
  supports and which reproduces Self Forcing's per-frame modulation.
* Token order is frame, row, column; with patch ``(1, p_h, p_w)`` a chunk never mixes frames, so chunking
  along frames is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from cachepolicy.cache import KVCache, metadata_for_chunk
from cachepolicy.errors import CacheShapeError, ParameterError, RolloutConfigError
from cachepolicy.layers import ForwardCall
from cachepolicy.models import ModelAdapter, ModelInfo, Sampler, module_weights_id

logger = logging.getLogger(__name__)

ROPE_HOOK_NAME = "cachepolicy_absolute_rope"


def apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, H, D]`` by interleaved-pair RoPE tables ``[1, L, 1, D]`` (diffusers' Wan formula)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanRotary:
    """Wan's 3-D rotary embedding (interleaved pairs; temporal, row and column axes) for the cache.

    ``cos_tables`` / ``sin_tables``: the rotary module's per-axis tables ``[max_seq_len, dim_axis]`` (temporal
    first), read from diffusers' own ``freqs_cos`` / ``freqs_sin`` buffers.
    """

    def __init__(self, cos_tables: Sequence[torch.Tensor], sin_tables: Sequence[torch.Tensor]) -> None:
        self.cos_tables = tuple(cos_tables)
        self.sin_tables = tuple(sin_tables)
        self.time_dim = cos_tables[0].shape[1]
        self.max_frames = cos_tables[0].shape[0]

    def tables(self, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.cos_tables[0].device
        frames, rows, cols = (t.to(device) for t in (frames, rows, cols))
        out = []
        for tables in (self.cos_tables, self.sin_tables):
            out.append(torch.cat([tables[0][frames], tables[1][rows], tables[2][cols]], dim=-1).unsqueeze(-2))
        return out[0], out[1]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin)

    def shift_frames(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate the temporal channels of ``x`` ``[B, L, H, D]`` by ``delta`` ``[B, L]`` frames (RoPE at
        ``p + delta`` equals RoPE at ``p`` followed by a rotation of ``delta``); spatial channels unchanged."""
        magnitude = delta.abs().to(self.cos_tables[0].device)
        if magnitude.numel() and int(magnitude.max()) >= self.max_frames:
            raise RolloutConfigError(f"a shift of {int(magnitude.max())} frames passes the model's RoPE table of "
                                     f"{self.max_frames} frames")
        cos_t = self.cos_tables[0][magnitude]
        sin_t = self.sin_tables[0][magnitude] * torch.sign(delta).to(cos_t.device, cos_t.dtype).unsqueeze(-1)
        rest = x.shape[-1] - self.time_dim
        cos = torch.cat([cos_t, cos_t.new_ones(*cos_t.shape[:-1], rest)], dim=-1).unsqueeze(-2)
        sin = torch.cat([sin_t, sin_t.new_zeros(*sin_t.shape[:-1], rest)], dim=-1).unsqueeze(-2)
        return apply_rotary(x, cos.to(x.device), sin.to(x.device))


class ForwardState:
    """What the processors and the RoPE hook need during one adapter forward (set, then cleared), and the
    cross-attention keys/values kept across forwards (:class:`CachedCrossAttnProcessor`)."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        #: what the cross-attention keys/values of this forward depend on: (id and version of the conditioning,
        #: the cache's serial and epoch, branch); None outside a forward
        self.context_key: tuple[int, ...] | None = None
        self.conditioning: torch.Tensor | None = None
        #: per (branch, layer): (context_key, conditioning, keys, values) of the last conditioning seen; the
        #: conditioning is held so that its id cannot be reused by another tensor while the entry exists
        self.cross: dict[tuple[int, int], tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        """End of a forward: forget the forward's state, keep the cross-attention keys/values."""
        self.cache = None
        self.rotary = None
        self.context_key = None
        self.conditioning = None


class AbsoluteRopeHook(ModelHook):
    """Replaces ``WanRotaryPosEmbed.forward`` by the chunk's precomputed absolute-position tables."""

    def __init__(self, state: ForwardState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state.rotary is None:  # called outside an adapter forward: behave like stock diffusers
            return self.fn_ref.original_forward(hidden_states)
        return self.state.rotary


class CachedWanAttnProcessor:
    """Self-attention of one Wan block against the KV cache: projections and q/k norms as diffusers'
    ``WanAttnProcessor``, then one call, :meth:`KVCache.attend` (RoPE, in-layer hooks, cache write,
    attention per head group)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, state: ForwardState) -> None:
        self.layer = layer
        self.state = state
        self._stock = WanAttnProcessor()

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, n, h, D]`` attention of ``query`` to ``key``/``value`` ``[B, S, h, D]`` under ``mask``."""
        return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        cache = self.state.cache
        if cache is None:  # not inside an adapter forward: stock behaviour
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        out = cache.attend(self.layer, query, key, value, attention=self.attention)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class CachedCrossAttnProcessor:
    """Cross-attention of one Wan block whose keys/values are computed once per conditioning.

    The prompt's keys and values do not change between the calls of a chunk (nor between chunks, until the
    prompt switches or the cache is flushed), so inside an adapter forward they are reused from the last call
    with the same conditioning tensor (same object and version), the same cache epoch and the same guidance
    branch: exactly what diffusers' ``WanAttnProcessor`` would compute, without the two projections per call.
    Outside an adapter forward, and for image-conditioned blocks, it is the stock processor.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, state: ForwardState, stock: Any = None) -> None:
        self.layer = layer
        self.state = state
        self._stock = stock or WanAttnProcessor()

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        state = self.state
        if state.context_key is None or attn.add_k_proj is not None or encoder_hidden_states is None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        slot = (state.context_key[-1], self.layer)
        entry = state.cross.get(slot)
        if entry is None or entry[0] != state.context_key:
            if attn.fused_projections:
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            entry = (state.context_key, state.conditioning, key, value.unflatten(2, (attn.heads, -1)))
            state.cross[slot] = entry
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, entry[2], entry[3], attn_mask=attention_mask, dropout_p=0.0,
                                    is_causal=False, backend=self._attention_backend)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class _MaskedProcessor:
    """Stock ``WanAttnProcessor`` with a fixed attention mask injected (the block passes none)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self._stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self._stock(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def masked_forward(
    model: WanTransformer3DModel,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """One full forward of a stock Wan model with a self-attention mask.

    Every ``blocks[i].attn1`` temporarily gets diffusers' own ``WanAttnProcessor`` with ``attention_mask``
    (bool ``[B or 1, 1 or H, L, L]``, True = may attend; or one such mask per block) injected; processors are
    restored afterwards. Used as the equivalence oracle and for block-causal training.
    """
    masks = list(attention_mask) if isinstance(attention_mask, (list, tuple)) else [attention_mask] * len(model.blocks)
    if len(masks) != len(model.blocks):
        raise ParameterError(f"{len(masks)} attention masks for a model of {len(model.blocks)} blocks")
    originals = [block.attn1.processor for block in model.blocks]
    hooks = _suspend_rope_hook(model)
    try:
        for block, mask in zip(model.blocks, masks):
            block.attn1.set_processor(_MaskedProcessor(mask))
        return model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                     return_dict=False)[0]
    finally:
        for block, processor in zip(model.blocks, originals):
            block.attn1.set_processor(processor)
        hooks()


FLOAT64_SINUSOID_HOOK = "cachepolicy_float64_sinusoid"


class Float64SinusoidHook(ModelHook):
    """Replaces ``condition_embedder.timesteps_proj.forward`` (diffusers' float32 ``get_timestep_embedding``) by
    the original Wan code's float64 sinusoid, ``sinusoidal_embedding_1d``: ``[cos(t * w), sin(t * w)]`` with
    ``w_i = 10000 ** (-i / half)``, computed in float64 and cast to float32. Diffusers' float32 sinusoid
    differs from it by about 1e-5 in a rollout's latents (see :func:`use_float64_sinusoid`)."""

    def new_forward(self, module: torch.nn.Module, timesteps: torch.Tensor) -> torch.Tensor:
        half = module.num_channels // 2
        position = timesteps.flatten().to(torch.float64)
        frequencies = torch.pow(10000, -torch.arange(half, device=position.device).to(position).div(half))
        sinusoid = torch.outer(position, frequencies)
        return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).to(torch.float32)


def use_float64_sinusoid(model: WanTransformer3DModel, enable: bool = True) -> None:
    """Compute the timestep sinusoid of ``model`` in float64, as every original Wan-based system does
    (``wan/modules/model.py:sinusoidal_embedding_1d`` casts the timesteps to float64), instead of diffusers'
    float32 (``enable=False`` restores diffusers'). A ``diffusers.hooks.ModelHook`` on
    ``model.condition_embedder.timesteps_proj``: no diffusers code is copied or patched.

    Reproducing a reference implementation to better than ~1e-5 needs it (the golden fixtures'
    ``tools/golden/README.md`` measures the float32 sinusoid's effect at 1.0e-5 .. 1.1e-5); otherwise it is
    off, and rollouts use diffusers' arithmetic.
    """
    proj = model.condition_embedder.timesteps_proj
    if not (proj.flip_sin_to_cos and proj.downscale_freq_shift == 0 and proj.scale == 1
            and proj.num_channels % 2 == 0):
        raise ParameterError(
            f"the model's timestep projection (flip_sin_to_cos={proj.flip_sin_to_cos}, "
            f"downscale_freq_shift={proj.downscale_freq_shift}, scale={proj.scale}, channels={proj.num_channels}) "
            f"is not Wan's [cos, sin] sinusoid; a float64 sinusoid is defined only for that"
        )
    registry = HookRegistry.check_if_exists_or_initialize(proj)
    present = registry.get_hook(FLOAT64_SINUSOID_HOOK) is not None
    if enable and not present:
        registry.register_hook(Float64SinusoidHook(), FLOAT64_SINUSOID_HOOK)
    elif not enable and present:
        registry.remove_hook(FLOAT64_SINUSOID_HOOK, recurse=False)


def _suspend_rope_hook(model: torch.nn.Module):
    """Remove our RoPE hook while a stock forward runs; return a function that puts it back."""
    registry = getattr(model.rope, "_diffusers_hook", None)
    hook = registry.get_hook(ROPE_HOOK_NAME) if registry is not None else None
    if hook is None:
        return lambda: None
    registry.remove_hook(ROPE_HOOK_NAME, recurse=False)
    return lambda: registry.register_hook(hook, ROPE_HOOK_NAME)


def block_causal_mask(frames_per_block: int, num_frames: int, tokens_per_frame: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[1, 1, L, L]`` mask: a token of block ``j`` attends to every token of blocks ``<= j``."""
    block = torch.arange(num_frames, device=device) // frames_per_block
    block = block.repeat_interleave(tokens_per_frame)
    return (block.unsqueeze(0) <= block.unsqueeze(1))[None, None]


class WanAdapter(ModelAdapter):
    """KV-cached autoregressive rollouts of any ``WanTransformer3DModel`` config.

    Args:
        model: the stock diffusers model (its ``attn1`` processors are swapped; see :meth:`detach`).
        name: model name recorded in outputs.
        latent_size: ``(H, W)`` latent pixels per frame (Wan2.1 at 480x832: ``(60, 104)``).
        frames_per_chunk: latent frames per chunk (3 for every Wan-based AR system).
        text_encoder: callable ``prompts -> [B, L, text_dim]`` conditioning, on any device.
        sampler: the model's default denoising recipe.
        decoder: callable ``latents [B, C, F, H, W] -> pixels [B, F', 3, H', W']`` in [0, 1] (a VAE), or None.
    """

    #: the diffusers class this adapter wraps, the family name in :class:`ModelInfo`, the cached processor
    #: swapped into every ``attn1`` and the name of the RoPE hook (a subclass for a Wan-architecture family
    #: such as SkyReels-V2 overrides these and :meth:`_model_call` / :meth:`_chunk_mask`)
    model_class: type = WanTransformer3DModel
    family = "wan"
    processor_class: type = CachedWanAttnProcessor
    rope_hook_name = ROPE_HOOK_NAME

    def __init__(
        self,
        model: WanTransformer3DModel,
        *,
        name: str,
        latent_size: tuple[int, int],
        text_encoder: Any,
        frames_per_chunk: int = 3,
        sampler: Sampler | None = None,
        decoder: Any = None,
    ) -> None:
        if not isinstance(model, self.model_class):
            raise ParameterError(
                f"{type(self).__name__} wraps a diffusers {self.model_class.__name__}, got {type(model).__name__}"
            )
        config = model.config
        p_t, p_h, p_w = config.patch_size
        height, width = latent_size
        if p_t != 1:
            raise ParameterError(f"patch_size {tuple(config.patch_size)}: chunked rollouts need a temporal patch of 1")
        if height % p_h or width % p_w:
            raise ParameterError(
                f"latent size {height}x{width} is not divisible by the patch size {p_h}x{p_w}"
            )
        if config.added_kv_proj_dim is not None or getattr(config, "image_dim", None) is not None:
            raise ParameterError(f"image-conditioned {self.family} models (added_kv_proj_dim, image_dim) are not "
                                 f"supported yet")
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.decoder = decoder
        # the compute dtype: modules kept in float32 (RoPE, norms, time embedder) do not count
        param = model.patch_embedding.weight
        self.info = ModelInfo(
            name=name,
            adapter=self.family,
            frames_per_chunk=frames_per_chunk,
            latent_channels=config.in_channels,
            latent_height=height,
            latent_width=width,
            token_rows=height // p_h,
            token_cols=width // p_w,
            num_layers=config.num_layers,
            num_heads=config.num_attention_heads,
            head_dim=config.attention_head_dim,
            max_frames=config.rope_max_seq_len,
            device=str(param.device),
            dtype=str(param.dtype).removeprefix("torch."),
            sampler=sampler or Sampler(),
        )
        self._state = ForwardState()
        self._last_tables: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._weights_id: str | None = None
        self._original_processors = [(block.attn1.processor, block.attn2.processor) for block in model.blocks]
        for layer, block in enumerate(model.blocks):
            block.attn1.set_processor(self.processor_class(layer, self._state))
            block.attn2.set_processor(CachedCrossAttnProcessor(layer, self._state, block.attn2.processor))
        HookRegistry.check_if_exists_or_initialize(model.rope).register_hook(
            AbsoluteRopeHook(self._state), self.rope_hook_name
        )
        # rotary tables per axis, [max_seq_len, dim_axis] (float64 like diffusers on CPU/CUDA)
        rope = model.rope
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        #: the model's rotary embedding for the cache (per-axis tables, float64 like diffusers on CPU/CUDA)
        self.rope = WanRotary(rope.freqs_cos.split(split, dim=1), rope.freqs_sin.split(split, dim=1))

    # ------------------------------------------------------------------------------------ lifecycle
    def detach(self) -> WanTransformer3DModel:
        """Restore the model's stock processors and RoPE; returns the model."""
        for block, (self_attention, cross_attention) in zip(self.model.blocks, self._original_processors):
            block.attn1.set_processor(self_attention)
            block.attn2.set_processor(cross_attention)
        self._state.cross.clear()
        HookRegistry.check_if_exists_or_initialize(self.model.rope).remove_hook(self.rope_hook_name, recurse=False)
        return self.model

    # ------------------------------------------------------------------------------------- contract
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        embeddings = self.text_encoder(list(prompts))
        param = self.model.patch_embedding.weight
        return embeddings.to(device=param.device, dtype=param.dtype)

    def new_cache(self, batch_size: int, *, rope_mode: str = "absolute", branches: int = 1) -> KVCache:
        info = self.info
        param = self.model.patch_embedding.weight
        cache = KVCache(info.num_layers, batch_size, info.num_heads, info.head_dim, info.token_cols,
                        device=param.device, dtype=param.dtype, rope_mode=rope_mode, branches=branches)
        cache.rotary = self.rope
        return cache

    def check_rollout(self, num_frames: int, batch_size: int) -> None:
        limit = self.info.max_frames
        if num_frames > limit:
            frames_per_chunk = self.info.frames_per_chunk
            raise RolloutConfigError(
                f"a rollout of {num_frames} latent frames ({num_frames // frames_per_chunk} chunks) passes the "
                f"model's rope_max_seq_len={limit}: RoPE positions stop at frame {limit - 1}; generate at most "
                f"{limit // frames_per_chunk} chunks"
            )
        if max(self.info.token_rows, self.info.token_cols) > limit:
            raise RolloutConfigError(
                f"a token grid of {self.info.token_rows}x{self.info.token_cols} passes rope_max_seq_len={limit}"
            )

    def rotary(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables ``[1, F * rows * cols, 1, head_dim]`` for the given frame positions ``[F]``."""
        rows, cols = self.info.token_rows, self.info.token_cols
        num_frames = frames.shape[0]
        out = []
        for tables in (self.rope.cos_tables, self.rope.sin_tables):
            t = tables[0][frames].view(num_frames, 1, 1, -1).expand(num_frames, rows, cols, -1)
            h = tables[1][:rows].view(1, rows, 1, -1).expand(num_frames, rows, cols, -1)
            w = tables[2][:cols].view(1, 1, cols, -1).expand(num_frames, rows, cols, -1)
            out.append(torch.cat([t, h, w], dim=-1).reshape(1, num_frames * rows * cols, 1, -1))
        return out[0], out[1]

    def _own_tables(self, rope_start: int, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`rotary` of frames ``rope_start ..`` (the last ones are kept: a chunk's forwards share them)."""
        key = (rope_start, num_frames)
        if self._last_tables is None or self._last_tables[0] != key:
            frames = torch.arange(rope_start, rope_start + num_frames, device=self.rope.cos_tables[0].device)
            self._last_tables = (key, self.rotary(frames))
        return self._last_tables[1]

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor, call: ForwardCall, cache: KVCache,
                conditioning: torch.Tensor) -> torch.Tensor:
        """One model call on ``latent`` ``[B, C, F, H, W]`` (timesteps ``[B, F]``) against ``cache``; its keys and
        values go to the provisional slot of ``call.branch``'s cells (see :meth:`ModelAdapter.forward`)."""
        info = self.info
        batch, channels, num_frames, height, width = latent.shape
        if (channels, height, width) != (info.latent_channels, info.latent_height, info.latent_width):
            raise CacheShapeError(
                f"latent of shape {tuple(latent.shape)} does not match the model's "
                f"[B, {info.latent_channels}, F, {info.latent_height}, {info.latent_width}]"
            )
        if batch != cache.batch_size:
            raise CacheShapeError(f"a batch of {batch} samples does not match the cache's batch of {cache.batch_size}")
        if conditioning.shape[0] != batch:
            raise CacheShapeError(f"conditioning for {conditioning.shape[0]} samples, latent has {batch}")
        if tuple(timesteps.shape) != (batch, num_frames):
            raise CacheShapeError(f"timesteps of shape {tuple(timesteps.shape)}: want [B, F] = {[batch, num_frames]}")
        if num_frames != call.num_frames:
            raise CacheShapeError(f"a latent of {num_frames} frames for a call of {call.num_frames}")
        rope_start = call.rope_start
        if rope_start < 0 or rope_start + num_frames > info.max_frames:
            raise RolloutConfigError(
                f"RoPE frame positions {rope_start}..{rope_start + num_frames - 1} are outside the model's "
                f"table of {info.max_frames} frames"
            )
        if call.rope_positions is not None and call.rope_positions.numel():
            positions = call.rope_positions.to(cache.device)[cache.view().valid]  # entries past a length: unused
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= info.max_frames):
                raise RolloutConfigError(
                    f"override RoPE positions {int(positions.min())}..{int(positions.max())} are outside the "
                    f"model's table of {info.max_frames} frames")
        own_tables = self._own_tables(rope_start, num_frames)
        own_positions = None if cache.rope_mode != "raw" else metadata_for_chunk(
            batch, rope_start, num_frames, info.token_rows, info.token_cols, 0, device=cache.device)
        state = self._state
        with cache.forward(call, rotary=self.rope, own_tables=own_tables, own_positions=own_positions,
                           own_mask=self._chunk_mask(num_frames, cache.device)):
            state.cache = cache
            state.rotary = own_tables
            state.context_key = (id(conditioning), conditioning._version, cache.serial, cache.epoch, call.branch)
            state.conditioning = conditioning
            try:
                with torch.no_grad():
                    return self._model_call(latent, timesteps, conditioning)
            finally:
                state.clear()

    def _model_call(self, latent: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """The stock model's forward on a chunk, timesteps ``[B, F]`` on the CPU: a ``(B,)`` timestep when the
        chunk's frames share one, else ``(B, L)`` per token (Self Forcing's per-frame modulation)."""
        device = latent.device
        if bool((timesteps == timesteps[:, :1]).all()):
            timestep = timesteps[:, 0].to(device=device, dtype=torch.float32)
        else:
            timestep = timesteps.repeat_interleave(self.info.tokens_per_frame, dim=1).to(device=device,
                                                                                          dtype=torch.float32)
        return self.model(hidden_states=latent, timestep=timestep, encoder_hidden_states=conditioning,
                          return_dict=False)[0]

    def _chunk_mask(self, num_frames: int, device: torch.device | str) -> torch.Tensor | None:
        """Bool ``[1, 1, n, n]`` structure inside a chunk, or None: a Wan chunk attends to itself fully."""
        return None

    def weights_id(self) -> str:
        """:func:`~cachepolicy.models.module_weights_id` of the transformer (computed once per load; the text
        encoder and VAE are named by their model options, not hashed)."""
        if self._weights_id is None:
            self._weights_id = module_weights_id(self.model)
        return self._weights_id

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, F', 3, H', W']`` in [0, 1] through the decoder given at construction (a VAE)."""
        if self.decoder is None:
            return super().decode(latent)
        return self.decoder(latent)

    def token_grid(self, latent: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, F, N, C * p_h * p_w]`` on the cache's token grid (row-major)."""
        _, p_h, p_w = self.model.config.patch_size
        batch, channels, num_frames, height, width = latent.shape
        grid = latent.reshape(batch, channels, num_frames, height // p_h, p_h, width // p_w, p_w)
        grid = grid.permute(0, 2, 3, 5, 1, 4, 6)  # B, F, rows, cols, C, p_h, p_w
        return grid.reshape(batch, num_frames, (height // p_h) * (width // p_w), channels * p_h * p_w)


# ------------------------------------------------------------------------------------------ loaders
def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or a torch dtype) -> torch dtype, with a clear error."""
    if isinstance(dtype, torch.dtype):
        return dtype
    allowed = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if dtype not in allowed:
        raise ParameterError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return allowed[dtype]


def cast_model(model: WanTransformer3DModel, device: str | torch.device,
               dtype: str | torch.dtype) -> WanTransformer3DModel:
    """Move a model to ``device`` and ``dtype`` as diffusers' ``from_pretrained(torch_dtype=...)`` does:
    parameters whose name contains an entry of ``_keep_in_fp32_modules`` (RoPE, time embedder, norms,
    modulation tables) stay float32."""
    dtype = parse_dtype(dtype)
    model = model.to(device=device)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and not any(part in name for part in keep):
                param.data = param.data.to(dtype)
    return model


def load_diffusers_wan(path: str | None = None, *, device: str = "cpu", dtype: str = "float32",
                       latent_size: tuple[int, int] = (60, 104), frames_per_chunk: int = 3,
                       text_encoder: Any = None, vae: Any = None) -> WanAdapter:
    """Load a ``WanTransformer3DModel`` saved in diffusers format from a local folder, strictly.

    ``path`` is the model folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``) or a pipeline
    folder with a ``transformer/`` subfolder. Missing, unexpected or mis-shaped keys raise
    :class:`~cachepolicy.errors.CheckpointError` (see :mod:`cachepolicy.adapters.wan.checkpoints`).
    ``text_encoder``: a UMT5 folder or hub id, or a callable; without one prompts are embedded by a
    deterministic hashed-word table (a warning says so). ``vae``: a Wan VAE folder or hub id, to decode.
    """
    from cachepolicy.adapters.wan.checkpoints import load_diffusers_folder, parse_latent_size
    from cachepolicy.adapters.wan.components import check_component_sources, resolve_components

    if path is None:
        raise ParameterError("model 'wan-diffusers' needs path=DIR (a folder with config.json and weights)")
    check_component_sources(text_encoder=text_encoder, vae=vae)
    model = load_diffusers_folder(str(path), dtype=dtype, device=device)
    encoder, decoder = resolve_components(model, model="wan-diffusers", text_encoder=text_encoder, vae=vae,
                                          device=device, dtype=dtype)
    return WanAdapter(model, name=str(path), latent_size=parse_latent_size(latent_size), text_encoder=encoder,
                      frames_per_chunk=frames_per_chunk, decoder=decoder)
