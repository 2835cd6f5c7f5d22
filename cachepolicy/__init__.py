"""cachepolicy: inference-time KV-cache policies for autoregressive video generation, as plugins.

The public Python API (mirrors the CLI)::

    import cachepolicy as cp

    model = cp.load_model("tiny-wan")
    policies = cp.build_policies("attention-sink:frames=3+sliding-window:frames=6")
    result = cp.rollout(model, policies, num_chunks=8, prompts=["a red square"], seeds=[0])
    result.latents        # [B, C, T, H, W]
    result.trace          # one dict per chunk

Heavy modules (torch, diffusers) are imported lazily so that ``cachepolicy --help`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("cachepolicy")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

_LAZY = {
    "load_model": "cachepolicy.api",
    "build_policies": "cachepolicy.api",
    "rollout": "cachepolicy.api",
    "run_to_dir": "cachepolicy.api",
    "read_run": "cachepolicy.api",
    "available_policies": "cachepolicy.api",
    "available_models": "cachepolicy.api",
    "calibrate": "cachepolicy.calibrate",
    "Policy": "cachepolicy.policy",
    "Selection": "cachepolicy.policy",
    "PruneRequest": "cachepolicy.policy",
    "CacheBound": "cachepolicy.policy",
    "ForwardCall": "cachepolicy.layers",
    "LayerRequest": "cachepolicy.layers",
    "LayerContext": "cachepolicy.layers",
    "LayerEdit": "cachepolicy.layers",
    "Merge": "cachepolicy.layers",
    "RopePositions": "cachepolicy.layers",
    "SeededNoise": "cachepolicy.noise",
    "RecordedNoise": "cachepolicy.noise",
    "OfficialNoise": "cachepolicy.noise",
    "hookimpl": "cachepolicy.hookspecs",
    "KVCache": "cachepolicy.cache",
    "CacheView": "cachepolicy.cache",
    "Session": "cachepolicy.engine",
    "RolloutConfig": "cachepolicy.engine",
    "RolloutResult": "cachepolicy.engine",
    "Sampler": "cachepolicy.models",
    "ModelInfo": "cachepolicy.models",
    "ModelAdapter": "cachepolicy.models",
    "ModelEntry": "cachepolicy.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cachepolicy' has no attribute {name!r}")
