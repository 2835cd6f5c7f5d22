"""The drift-lab model: a small stock ``diffusers.WanTransformer3DModel`` and the helpers that drive it.

Nothing of ``transformer_wan.py`` is copied or forked. The block-causal attention used in training and
in the evaluation sampler is injected by replacing every ``blocks[i].attn1`` processor with a
:class:`MaskedWanAttnProcessor`, which calls diffusers' own ``WanAttnProcessor`` with the mask (the
block itself passes none).

Token layout (stock Wan): tokens are ordered frame, row, column; with the lab's patch ``(1, 1, 1)`` on
the ``[B, C, T, h, w]`` latent, frame ``f`` owns tokens ``f*h*w .. (f+1)*h*w - 1`` and chunk ``k``
(``chunk_frames`` frames) owns a contiguous run of ``chunk_frames*h*w`` tokens.

Flow-matching convention: ``x_t = (1 - sigma) * x0 + sigma * eps``, the model predicts
``v = eps - x0`` and is called with ``timestep = sigma * 1000`` per token (shape ``[B, L]``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from cachepolicy.lab.errors import LabCheckpointError, LabError
from cachepolicy.lab.latent import PixelUnshuffleLatent
from cachepolicy.lab.scenes import SceneConfig
from cachepolicy.lab.text import TextConfig

__all__ = [
    "LabConfig",
    "MaskedWanAttnProcessor",
    "block_causal_mask",
    "build_transformer",
    "chunk_token_timesteps",
    "install_masked_attention",
    "load_lab_config",
    "masked_attention",
]

#: What may re-noise ``x0`` between sampler steps (``LabConfig.sampler_noise``, the engine's ``Sampler.noise``).
SAMPLER_NOISES = ("fresh", "predicted")


@attrs.frozen
class LabConfig:
    """Everything that defines a drift-lab model: scenes, latent transform, text embedding, transformer.

    Attributes:
        scene: scene geometry used for training (``scene.num_frames`` = trained context in frames; 1 or 2
            sprites per scene by default, as in the shipped weights).
        latent_factor: pixel-unshuffle factor of the latent transform.
        text: text-embedding shape.
        dim_head: attention head width.
        heads: attention heads (model width ``dim = heads * dim_head``).
        layers: transformer blocks.
        ffn_dim: feed-forward hidden width.
        freq_dim: width of the sinusoidal timestep embedding.
        chunk_frames: latent frames per AR chunk (3, as in every Wan AR system).
        sampler_steps: denoising steps per chunk the model is sampled with.
        sampler_shift: flow-matching shift of the sampler's sigma schedule.
        sampler_noise: what re-noises the predicted clean latent ``x0`` between steps (the engine's
            :class:`~cachepolicy.models.Sampler` ``noise``): ``"fresh"`` noise (a stochastic sampler, the
            default: with guidance it draws two-sprite scenes right, see the drift-lab docs) or the noise
            the model ``"predicted"`` (the deterministic Euler step of the flow ODE). A ``config.json`` written
            before this field existed means ``"predicted"`` (see :func:`load_lab_config`).
        sampler_guidance: classifier-free guidance scale of the sampler (1 = none; default 2; the model is
            trained with prompt dropout, so the empty prompt is its unconditional input). A ``config.json``
            written before this field existed means 1.
    """

    scene: SceneConfig = SceneConfig(max_sprites=2)
    latent_factor: int = 2
    text: TextConfig = TextConfig()
    dim_head: int = 32
    heads: int = 4
    layers: int = 4
    ffn_dim: int = 512
    freq_dim: int = 64
    chunk_frames: int = 3
    sampler_steps: int = 24
    sampler_shift: float = 1.0
    sampler_noise: str = "fresh"
    sampler_guidance: float = 2.0

    def __attrs_post_init__(self) -> None:
        if self.sampler_noise not in SAMPLER_NOISES:
            raise LabError(f"sampler_noise={self.sampler_noise!r} is not allowed; choose one of "
                           f"{', '.join(SAMPLER_NOISES)}")
        if not (isinstance(self.sampler_guidance, (int, float)) and math.isfinite(self.sampler_guidance)
                and self.sampler_guidance >= 0):
            raise LabError(f"sampler_guidance must be a finite scale >= 0 (1 = no guidance), got "
                           f"{self.sampler_guidance!r}")
        if not isinstance(self.sampler_steps, int) or isinstance(self.sampler_steps, bool) or self.sampler_steps < 1:
            raise LabError(f"sampler_steps must be a positive int, got {self.sampler_steps!r}")
        if self.scene.num_frames % self.chunk_frames:
            raise LabError(
                f"scene.num_frames={self.scene.num_frames} is not a multiple of chunk_frames={self.chunk_frames}"
            )
        if self.scene.height % self.latent_factor or self.scene.width % self.latent_factor:
            raise LabError(
                f"frame size {self.scene.height}x{self.scene.width} is not divisible by latent_factor="
                f"{self.latent_factor}"
            )

    @property
    def latent(self) -> PixelUnshuffleLatent:
        """The pixel <-> latent transform."""
        return PixelUnshuffleLatent(self.latent_factor)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Latent (= token grid) height and width."""
        return self.scene.height // self.latent_factor, self.scene.width // self.latent_factor

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per latent frame (patch ``(1, 1, 1)``)."""
        h, w = self.latent_hw
        return h * w

    @property
    def train_chunks(self) -> int:
        """Trained context length in chunks."""
        return self.scene.num_frames // self.chunk_frames

    def transformer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``WanTransformer3DModel`` for this configuration."""
        c = self.latent.channels
        return dict(
            patch_size=(1, 1, 1),
            num_attention_heads=self.heads,
            attention_head_dim=self.dim_head,
            in_channels=c,
            out_channels=c,
            text_dim=self.text.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :func:`load_lab_config` reads it back."""
        return attrs.asdict(self)


def load_lab_config(data: dict[str, Any] | str | Path) -> LabConfig:
    """Build a :class:`LabConfig` from :meth:`LabConfig.to_dict` output or a JSON file holding it."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise LabCheckpointError(f"no lab config file at {path}")
        try:
            data = json.loads(path.read_bytes())
        except ValueError as exc:  # also bytes that are not UTF-8
            raise LabCheckpointError(f"lab config {path} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise LabCheckpointError(f"lab config {path} holds a JSON {type(data).__name__}, not an object")
    data = dict(data)
    # configs written before ``sampler_noise`` / ``sampler_guidance`` existed were sampled with the Euler
    # step and without guidance
    data.setdefault("sampler_noise", "predicted")
    data.setdefault("sampler_guidance", 1.0)
    try:
        scene = SceneConfig(**data.pop("scene"))
        text = TextConfig(**data.pop("text"))
        return LabConfig(scene=scene, text=text, **data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise LabCheckpointError(f"malformed lab config {data!r}: {exc}") from exc


def build_transformer(config: LabConfig, seed: int | None = None) -> WanTransformer3DModel:
    """A fresh stock ``WanTransformer3DModel`` for ``config`` (float32, on CPU).

    Wan's default init zeroes nothing that matters for training from scratch; the output head is
    initialised small (std 0.02) rather than diffusers' default so that early predictions are near zero.
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = WanTransformer3DModel(**config.transformer_kwargs())
    with torch.no_grad():
        torch.nn.init.normal_(model.proj_out.weight, std=0.02)
        torch.nn.init.zeros_(model.proj_out.bias)
    return model


class MaskedWanAttnProcessor:
    """Self-attention processor that calls diffusers' ``WanAttnProcessor`` with an injected mask.

    ``mask`` is a boolean ``[L, L]`` tensor (``True`` = may attend, query rows, key columns), an additive
    float ``[L, L]`` tensor, or ``None`` (full attention); booleans are stored as additive masks. One instance is shared by all blocks; set ``mask`` before each forward (or use
    :func:`masked_attention`).
    """

    def __init__(self) -> None:
        self._inner = WanAttnProcessor()
        self._mask: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor | None:
        """The mask in use: additive ``float [L, L]`` (``0`` attend, ``-inf`` blocked) or ``None``."""
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        # SDPA's CPU kernel is ~20% faster with an additive float mask than with a boolean one.
        if value is not None and value.dtype == torch.bool:
            if not bool(value.any(dim=-1).all()):
                raise LabError("attention mask has a query row that may attend to nothing")
            value = torch.zeros(value.shape, dtype=torch.float32, device=value.device).masked_fill(
                ~value, float("-inf")
            )
        self._mask = value

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        mask = attention_mask if attention_mask is not None else self._mask
        if mask is not None and mask.dtype != hidden_states.dtype and mask.dtype != torch.bool:
            mask = mask.to(hidden_states.dtype)
        if mask is not None and mask.shape[-1] != hidden_states.shape[1]:
            raise LabError(
                f"attention mask covers {mask.shape[-1]} tokens but the sequence has {hidden_states.shape[1]}"
            )
        return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask=mask, rotary_emb=rotary_emb)


def install_masked_attention(model: WanTransformer3DModel) -> MaskedWanAttnProcessor:
    """Replace every ``blocks[i].attn1`` processor by one shared :class:`MaskedWanAttnProcessor`."""
    for block in model.blocks:
        if isinstance(block.attn1.processor, MaskedWanAttnProcessor):
            return block.attn1.processor
    proc = MaskedWanAttnProcessor()
    for block in model.blocks:
        block.attn1.set_processor(proc)
    return proc


@contextmanager
def masked_attention(model: WanTransformer3DModel, mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, every self-attention of ``model`` uses ``mask`` (``bool [L, L]``)."""
    proc = install_masked_attention(model)
    previous = proc.mask
    proc.mask = mask
    try:
        yield
    finally:
        proc.mask = previous


def block_causal_mask(num_chunks: int, tokens_per_chunk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Frame-block-causal mask ``bool [L, L]``, ``L = num_chunks * tokens_per_chunk``.

    Entry ``[i, j]`` is ``True`` iff token ``j``'s chunk is not later than token ``i``'s chunk.
    """
    if num_chunks < 1 or tokens_per_chunk < 1:
        raise LabError(f"need positive num_chunks and tokens_per_chunk, got {num_chunks}, {tokens_per_chunk}")
    chunk = torch.arange(num_chunks, device=device).repeat_interleave(tokens_per_chunk)
    return chunk[None, :] <= chunk[:, None]


def chunk_token_timesteps(sigmas: torch.Tensor, tokens_per_chunk: int) -> torch.Tensor:
    """Per-token Wan timesteps ``[B, L]`` (``sigma * 1000``) from per-chunk sigmas ``[B, num_chunks]``."""
    if sigmas.ndim != 2:
        raise LabError(f"expected per-chunk sigmas [B, num_chunks], got {tuple(sigmas.shape)}")
    return (sigmas * 1000.0).repeat_interleave(tokens_per_chunk, dim=1)
