"""Shared fixtures: the plugin registry and tiny seeded Wan models."""

from __future__ import annotations

import os
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, settings

from cachepolicy.registry import discover

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def registry():
    return discover()


@pytest.fixture
def tiny_wan():
    """Factory: ``tiny_wan(seed=0, latent_size=(8, 8), **config)`` -> a fresh WanAdapter."""
    from cachepolicy.adapters.wan.tiny import load_tiny_wan

    def make(seed: int = 0, **kwargs):
        return load_tiny_wan(seed, **kwargs)

    return make


@pytest.fixture
def broken_policy(monkeypatch):
    """Installs the policy ``broken:chunk=K`` (its ``chunk_start`` hook raises ``KeyError`` at chunk K) into the
    process-wide registry, as a third-party plugin with a bug would be; returns its class."""
    import attrs

    from cachepolicy.hookspecs import hookimpl
    from cachepolicy.policy import Policy
    from cachepolicy.registry import get_registry

    @attrs.frozen
    class Broken(Policy):
        name: ClassVar[str] = "broken"
        chunk: int = 2

        @hookimpl
        def cachepolicy_chunk_start(self, session, chunk):
            if chunk == self.chunk:
                raise KeyError("oops")

    monkeypatch.setitem(get_registry().policies, "broken", Broken)
    return Broken
