"""The per-layer path makes no host-device synchronisation, checked on the CPU.

On a GPU, reading a tensor's value on the host (``bool(t)``, ``t.item()``, ``t.tolist()``, ``t.cpu()``,
``t.numpy()``, ``nonzero``) waits for the device. Inside every cached self-attention call (once per layer
per forward) these are made to raise, for every cache layout the engine produces: a uniform batch, a
padded batch (samples pruned differently), raw keys re-rotated on read (Rolling Forcing), LongLive's
re-encoding pass, the SkyReels adapter, and heads split into groups with an in-layer hook that reads
scores. ``tests/adapters/test_gpu.py`` checks the same on CUDA with ``torch.cuda.set_sync_debug_mode("error")``
where a GPU exists.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import attrs
import pytest
import torch

from cachepolicy.adapters.wan import adapter as wan_adapter
from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.api import build_policies, load_model, rollout
from cachepolicy.engine import PromptSwitch
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerRequest
from cachepolicy.policy import Policy
from tests.adapters.test_granular import MODEL, RandomKeep, recorded

HOST_READS = ("__bool__", "item", "tolist", "cpu", "numpy", "nonzero")


@contextlib.contextmanager
def no_host_reads():
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    saved_nonzero = torch.nonzero

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} inside the per-layer path")
        return call

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    torch.nonzero = refuse("nonzero")
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.Tensor, name, function)
        torch.nonzero = saved_nonzero


@pytest.fixture
def strict_layers(monkeypatch):
    original = wan_adapter.CachedWanAttnProcessor.__call__
    calls = []

    def strict(self, attn, hidden_states, *args, **kwargs):
        if self.state.cache is None:
            return original(self, attn, hidden_states, *args, **kwargs)
        with no_host_reads():
            out = original(self, attn, hidden_states, *args, **kwargs)
        calls.append(self.layer)
        return out

    monkeypatch.setattr(wan_adapter.CachedWanAttnProcessor, "__call__", strict)
    return calls


PROMPTS = ["a red fox runs", "a blue bird flies"]


@pytest.mark.parametrize("model, policies, recipe, switches", [
    ("tiny-wan", "attention-sink:frames=3+sliding-window:frames=3", None, ()),
    ("tiny-wan", "attention-sink:frames=3+sliding-window:frames=3+tokentrim:p=0.3,lambda=0.1,warmup=1,summary_at=final",
     None, ()),
    ("tiny-wan", "full", "longlive", (PromptSwitch(3, "a green frog"),)),
    ("tiny-wan", "tokentrim:p=0.3,lambda=0.1,warmup=1,summary_at=final", "rolling-forcing", ()),
    ("tiny-skyreels", "attention-sink:frames=3+sliding-window:frames=3", None, ()),
])
def test_no_host_read_inside_any_layer_call(strict_layers, model, policies, recipe, switches):
    adapter = load_model(model)
    result = rollout(adapter, build_policies(policies), num_chunks=6, prompts=PROMPTS, seeds=[0, 1],
                     recipe=recipe, prompt_switches=switches)
    assert strict_layers, "the cached processor was never called"
    assert bool(torch.isfinite(result.latents).all())
    if "tokentrim" in policies:  # the padded-batch path really ran
        assert any(r["retries"] for r in result.trace)


@attrs.frozen
class Observer(Policy):
    """Reads every layer's logits and edits nothing."""

    name: ClassVar[str] = "observer"

    def new_state(self):
        return []

    @hookimpl
    def cachepolicy_layer_request(self, session, call):
        return LayerRequest()

    @hookimpl
    def cachepolicy_layer(self, session, layer):
        self.state(session).append(tuple(layer.logits().shape))


def test_no_host_read_with_head_groups_and_a_layer_observer(strict_layers):
    """Heads split into groups (one attention call each) and an in-layer hook that only reads."""
    observer = Observer()
    _, _, session = recorded(load_tiny_wan(seed=1, **MODEL), [RandomKeep(granularity="group"), observer], 4, [0, 1])
    assert any(len(session.cache.layer_cells(layer)) > 1 for layer in range(MODEL["num_layers"]))
    assert session.policy_state[observer.spec] and strict_layers
