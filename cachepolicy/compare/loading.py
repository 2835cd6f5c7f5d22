"""The process's loaded model, shared by the checks and the jobs of one comparison."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_MODEL_CACHE: dict[str, Any] = {}


def load_model_cached(model: str, options: Mapping[str, Any], load_token: str) -> Any:
    """The process's loaded model for these options within one comparison (``load_token``, new per
    :func:`~cachepolicy.compare.driver.run_compare` call): the jobs of a comparison share a load, a later
    comparison loads anew (the weights may have been retrained at the same path since)."""
    from cachepolicy.api import load_model

    key = json.dumps([model, dict(sorted(options.items())), load_token], sort_keys=True)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model per process at a time
        _MODEL_CACHE[key] = load_model(model, **dict(options))
    return _MODEL_CACHE[key]
