"""``full``: keep every token (no eviction).

The baseline of every comparison: Self Forcing and CausVid with no ``local_attn_size`` (Self Forcing's
default; its released checkpoint is trained for 21 latent frames). Memory grows linearly with length,
and the rollout stops at the model's RoPE table (``rope_max_seq_len`` frames).
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import Policy


@attrs.frozen
class Full(Policy):
    """Keep every committed token. Has no parameters and drops nothing."""

    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "keep every token (the baseline)"


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [Full]
