"""The GPU path: ``--device cuda --dtype bfloat16`` through the same code. Skipped without CUDA.

On a CUDA machine: a bfloat16 rollout on the GPU stays close to the float32 CPU rollout, and the per-layer
path (every cached self-attention call, including the padded-batch case after TokenTrim-like uneven
pruning) makes no host-device synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises on one).
"""

from __future__ import annotations

import pytest
import torch

from cachepolicy.adapters.wan import adapter as wan_adapter
from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.api import build_policies, rollout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")

PROMPTS = ["a red fox runs", "a blue bird flies"]


def _rollout(device: str, dtype: str, policies: str):
    adapter = load_tiny_wan(seed=1, device=device, dtype=dtype)
    return rollout(adapter, build_policies(policies), num_chunks=4, prompts=PROMPTS, seeds=[0, 1]).latents


def test_bfloat16_on_cuda_is_close_to_float32_on_cpu():
    reference = _rollout("cpu", "float32", "attention-sink:frames=3+sliding-window:frames=3")
    on_gpu = _rollout("cuda", "bfloat16", "attention-sink:frames=3+sliding-window:frames=3")
    assert bool(torch.isfinite(on_gpu).all())
    relative = (on_gpu.float() - reference).norm() / reference.norm()
    assert relative < 0.05, float(relative)


def test_no_host_device_sync_inside_the_per_layer_path(monkeypatch):
    original = wan_adapter.CachedWanAttnProcessor.__call__
    calls = []

    def strict(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            calls.append(self.layer)

    monkeypatch.setattr(wan_adapter.CachedWanAttnProcessor, "__call__", strict)
    # an eager TokenTrim prunes the two samples differently, so the padded-batch path runs too
    _rollout("cuda", "bfloat16", "attention-sink:frames=3+sliding-window:frames=3+tokentrim:p=0.2,lambda=0.5,warmup=1")
    assert calls, "the cached processor was never called"
