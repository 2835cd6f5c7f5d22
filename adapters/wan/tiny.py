"""``tiny-wan``: a seeded random tiny ``WanTransformer3DModel`` for tests and demos.

Every parameter is randomised (Wan's default initialisation leaves parts of the model at zero, which would
make equivalence tests vacuous); weights are drawn from a seeded CPU generator, so the same seed gives the
same model on any machine.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from cachepolicy.adapters.wan.adapter import WanAdapter, cast_model
from cachepolicy.errors import ParameterError
from cachepolicy.models import Sampler

TINY_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 48,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values of a sensible scale (in place)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "scale_shift_table" not in name:
                fan_in = math.prod(param.shape[1:])
                values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
            elif name.endswith("bias"):
                values = 0.1 * torch.randn(param.shape, generator=generator)
            elif "scale_shift_table" in name:
                values = 0.5 * torch.randn(param.shape, generator=generator)
            else:  # norm weights
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            param.copy_(values.to(param.dtype))
    return model


def tiny_wan_model(seed: int = 0, **overrides: Any) -> WanTransformer3DModel:
    """A random ``WanTransformer3DModel`` from :data:`TINY_CONFIG` (``overrides`` change config keys)."""
    unknown = set(overrides) - set(TINY_CONFIG)
    if unknown:
        raise ParameterError(f"unknown tiny-wan config keys {sorted(unknown)}; known: {sorted(TINY_CONFIG)}")
    config = {**TINY_CONFIG, **overrides}
    torch.manual_seed(seed)  # diffusers' own init (replaced right after) must not depend on global state
    model = WanTransformer3DModel(**config)
    return randomize_(model, seed)


class HashedWordEncoder:
    """Deterministic stand-in text encoder: each word maps to a fixed random vector of ``text_dim``.

    A prompt becomes ``[max_words, text_dim]``: its words' vectors then zero padding (like UMT5's padded
    512-token context). Same prompt, same embedding, on every machine.
    """

    def __init__(self, text_dim: int, max_words: int = 16) -> None:
        self.text_dim = text_dim
        self.max_words = max_words

    def word_vector(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
        return torch.randn(self.text_dim, generator=torch.Generator("cpu").manual_seed(seed))

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.max_words, self.text_dim)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(prompt.lower().split()[: self.max_words]):
                out[i, j] = self.word_vector(word)
        return out


def load_tiny_wan(seed: int = 0, *, device: str = "cpu", dtype: str = "float32",
                  latent_size: tuple[int, int] = (8, 8), frames_per_chunk: int = 3,
                  sampler: Sampler | None = None, **config_overrides: Any) -> WanAdapter:
    """The ``tiny-wan`` model: random weights from ``seed``, 8x8 latent (16 tokens per frame)."""
    model = cast_model(tiny_wan_model(seed, **config_overrides), device, dtype)
    return WanAdapter(model, name="tiny-wan", latent_size=tuple(latent_size),
                      text_encoder=HashedWordEncoder(model.config.text_dim), frames_per_chunk=frames_per_chunk,
                      sampler=sampler)
