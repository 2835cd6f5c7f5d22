"""SkyReels-V2 adapter on stock ``diffusers.SkyReelsV2Transformer3DModel`` (entry point ``skyreels``).

SkyReels-V2 (arXiv 2504.13074) is a Wan2.1-architecture video transformer trained with diffusion forcing:
each latent frame has its own timestep and frames form causal blocks (``causal_block_size``). The adapter
runs it chunk by chunk against the project's KV cache: keys stored after RoPE at absolute frame positions,
per-frame ``[B, F]`` timesteps through diffusers' diffusion-forcing path, the fps embedding of models with
``inject_sample_info``. This module is what discovery imports: it stays light (no torch, no diffusers); the
adapter lives in :mod:`cachepolicy.adapters.skyreels.adapter`.
"""

from __future__ import annotations

from cachepolicy.hookspecs import hookimpl
from cachepolicy.models import ModelEntry

MODELS = [
    ModelEntry(
        name="tiny-skyreels",
        adapter="skyreels",
        loader="cachepolicy.adapters.skyreels.adapter:load_tiny_skyreels",
        summary="seeded random tiny SkyReelsV2Transformer3DModel (tiny-wan's sizes, fps embedding, 3-frame causal "
                "blocks) for tests and demos",
    ),
    ModelEntry(
        name="skyreels-diffusers",
        adapter="skyreels",
        loader="cachepolicy.adapters.skyreels.adapter:load_diffusers_skyreels",
        summary="any text-to-video SkyReelsV2Transformer3DModel saved in diffusers format (path=DIR with "
                "config.json + safetensors)",
    ),
]


@hookimpl
def cachepolicy_models() -> list[ModelEntry]:
    return list(MODELS)
