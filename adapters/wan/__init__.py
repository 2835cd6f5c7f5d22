"""Wan2.1 adapter on stock ``diffusers.WanTransformer3DModel`` (entry point ``wan``).

This module is what discovery imports: it stays light (no torch, no diffusers) and names its models with
lazy loaders. The adapter itself lives in :mod:`cachepolicy.adapters.wan.adapter`.
"""

from __future__ import annotations

from cachepolicy.hookspecs import hookimpl
from cachepolicy.models import ModelEntry

MODELS = [
    ModelEntry(
        name="tiny-wan",
        adapter="wan",
        loader="cachepolicy.adapters.wan.tiny:load_tiny_wan",
        summary="seeded random tiny WanTransformer3DModel (2 layers, 8x8 latent, 16 tokens/frame) for tests and demos",
    ),
    ModelEntry(
        name="wan-diffusers",
        adapter="wan",
        loader="cachepolicy.adapters.wan.adapter:load_diffusers_wan",
        summary="any WanTransformer3DModel saved in diffusers format (path=DIR with config.json + safetensors)",
    ),
]


@hookimpl
def cachepolicy_models() -> list[ModelEntry]:
    return list(MODELS)
