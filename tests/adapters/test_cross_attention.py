"""The prompt's cross-attention keys/values are computed once per conditioning and reused, bit for bit."""

from __future__ import annotations

import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.engine import PromptSwitch, RolloutConfig, Session
from cachepolicy.models import Sampler
from tests.oracle import adapter_forward

FAST = Sampler(denoising_steps=(1000, 500), shift=3.0)


def count_projections(adapter):
    """Counts calls of every block's cross-attention key projection."""
    calls = []
    for layer, block in enumerate(adapter.model.blocks):
        block.attn2.to_k.register_forward_hook(lambda module, args, out, layer=layer: calls.append(layer))
    return calls


def test_reused_keys_give_the_stock_outputs_bit_for_bit():
    adapter, stock = load_tiny_wan(seed=2), load_tiny_wan(seed=2)
    for block in stock.model.blocks:  # the stock cross-attention processor: projections on every call
        block.attn2.set_processor(block.attn2.processor._stock)
    calls = count_projections(adapter)
    config = RolloutConfig(num_chunks=3, prompts=["a red fox", "a blue bird"], seeds=[0, 1], sampler=FAST,
                           prompt_switches=[PromptSwitch(2, "a green frog")])
    reused, plain = Session(adapter, [], config).run(), Session(stock, [], config).run()
    assert torch.equal(reused.latents, plain.latents)
    # once per layer for the first prompts, once more at the switch; not once per forward (9 forwards)
    assert len(calls) == 2 * adapter.info.num_layers


def test_guidance_branches_flushes_and_edited_conditionings_recompute():
    adapter = load_tiny_wan(seed=3)
    calls = count_projections(adapter)
    config = RolloutConfig(num_chunks=2, prompts=["a red fox"], seeds=[0], sampler=Sampler(
        denoising_steps=(1000, 500), shift=3.0, guidance=2.0))
    Session(adapter, [], config).run()
    layers = adapter.info.num_layers
    assert len(calls) == 2 * layers  # the conditional and the empty prompt, once each
    cache = adapter.new_cache(1)
    conditioning = adapter.encode_prompts(["a cat"])
    latent = torch.zeros(1, 4, 3, 8, 8)
    calls.clear()
    for _ in range(2):
        adapter_forward(adapter, latent, torch.zeros(1, 3), 0, 0, cache, conditioning, False)
    assert len(calls) == layers
    cache.flush(torch.ones(1, 0, dtype=torch.bool))
    adapter_forward(adapter, latent, torch.zeros(1, 3), 0, 0, cache, conditioning, False)
    assert len(calls) == 2 * layers  # a flush marks what the model caches about the context as stale
    conditioning.mul_(2.0)  # edited in place: a new version
    adapter_forward(adapter, latent, torch.zeros(1, 3), 0, 0, cache, conditioning, False)
    assert len(calls) == 3 * layers
