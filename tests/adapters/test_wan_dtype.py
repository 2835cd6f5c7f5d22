"""The bfloat16 path (what ``--device cuda --dtype bfloat16`` runs) through the same code, on the CPU."""

from __future__ import annotations

import pytest
import torch

from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import ParameterError
from cachepolicy.policy import build_policies


def test_bfloat16_rollout_tracks_float32(tiny_wan, registry):
    policies = build_policies("attention-sink:frames=3+sliding-window:frames=3", registry.policies)
    config = RolloutConfig(num_chunks=4, prompts=["a red square"], seeds=[0])
    full = Session(tiny_wan(seed=8), policies, config)
    reference = full.run()
    half = Session(tiny_wan(seed=8, dtype="bfloat16"), policies, config)
    result = half.run()
    assert half.cache.dtype == torch.bfloat16 and all(c.k.dtype == torch.bfloat16 for c in half.cache.cells)
    model = half.adapter.model
    # modules diffusers keeps in float32 stay float32, the rest is bfloat16
    assert model.patch_embedding.weight.dtype == torch.bfloat16
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert bool(torch.isfinite(result.latents).all())
    assert [r["cache_tokens"] for r in result.trace] == [r["cache_tokens"] for r in reference.trace]
    error = (result.latents - reference.latents).abs().mean() / reference.latents.abs().mean()
    assert error < 0.05, f"bf16 drifted {float(error):.3f} (relative mean abs) from fp32"


def test_unsupported_dtype_is_refused(tiny_wan):
    from cachepolicy.errors import ParameterError

    with pytest.raises(ParameterError, match="dtype 'int8' is not supported; use one of float32, bfloat16, float16"):
        tiny_wan(dtype="int8")


def test_float64_sinusoid_hook_is_the_original_formula_and_can_be_removed(tiny_wan):
    """``use_float64_sinusoid``: the original Wan ``sinusoidal_embedding_1d`` (float64, then float32), written
    out here by hand; diffusers' own float32 sinusoid differs from it; removing the hook restores it."""
    from cachepolicy.adapters.wan.adapter import use_float64_sinusoid

    model = tiny_wan(seed=0).model
    proj = model.condition_embedder.timesteps_proj
    t = torch.tensor([1000.0, 937.5, 833.3333129882812, 625.0, 0.0])
    stock = proj(t)
    half = proj.num_channels // 2
    angles = t.double()[:, None] * torch.tensor([10000.0 ** (-i / half) for i in range(half)], dtype=torch.float64)
    expected = torch.cat([angles.cos(), angles.sin()], dim=1).float()
    use_float64_sinusoid(model)
    use_float64_sinusoid(model)  # idempotent
    assert torch.equal(proj(t), expected)
    assert (stock - expected).abs().max() > 1e-6  # diffusers' float32 sinusoid is not it
    use_float64_sinusoid(model, enable=False)
    assert torch.equal(proj(t), stock)
    proj.downscale_freq_shift = 1
    with pytest.raises(ParameterError, match="not Wan.s"):
        use_float64_sinusoid(model)
