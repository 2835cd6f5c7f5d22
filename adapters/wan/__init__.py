"""Wan2.1 adapter on stock ``diffusers.WanTransformer3DModel`` (entry point ``wan``).

This module is what discovery imports: it stays light (no torch, no diffusers) and names its models with
lazy loaders. The adapter itself lives in :mod:`cachepolicy.adapters.wan.adapter`.
"""

from __future__ import annotations

from cachepolicy.hookspecs import hookimpl
from cachepolicy.models import ModelEntry

MODELS = [
    ModelEntry(
        name="drift-lab",
        adapter="wan",
        loader="cachepolicy.adapters.wan.drift_lab:load_drift_lab",
        summary="the drift lab's model trained here on 16x16 sprite scenes with known ground truth (shipped weights)",
        provides_ground_truth=True,
    ),
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
    ModelEntry(
        name="self-forcing",
        adapter="wan",
        loader="cachepolicy.adapters.wan.checkpoints:load_self_forcing",
        summary="Self Forcing training checkpoint (checkpoint=FILE, e.g. self_forcing_dmd.pt; ema=true by default)",
    ),
    ModelEntry(
        name="rolling-forcing",
        adapter="wan",
        loader="cachepolicy.adapters.wan.checkpoints:load_rolling_forcing",
        summary="Rolling Forcing training checkpoint (checkpoint=FILE, e.g. rolling_forcing_dmd.pt; "
                "ema=true by default)",
    ),
    ModelEntry(
        name="causvid",
        adapter="wan",
        loader="cachepolicy.adapters.wan.checkpoints:load_causvid",
        summary="CausVid training checkpoint (checkpoint=FILE or its folder with model.pt; ema=false by default)",
    ),
    ModelEntry(
        name="longlive",
        adapter="wan",
        loader="cachepolicy.adapters.wan.checkpoints:load_longlive",
        summary="LongLive 1.0 base checkpoint with its LoRA merged (checkpoint=longlive_base.pt, lora=lora.pt; "
                "ema=false by default)",
    ),
    ModelEntry(
        name="wan-checkpoint",
        adapter="wan",
        loader="cachepolicy.adapters.wan.checkpoints:load_wan_checkpoint",
        summary="any original-layout Wan2.1 T2V checkpoint: generator/generator_ema dicts or a bare state dict "
                "(checkpoint=FILE, ema=true|false)",
    ),
]


@hookimpl
def cachepolicy_models() -> list[ModelEntry]:
    return list(MODELS)
