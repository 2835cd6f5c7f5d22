"""``random-drop``: a control policy that drops a random fraction of the context, for cachepolicy.

After chunk ``c`` is committed, for each sample this policy drops ``round(fraction * n)`` tokens chosen
uniformly at random among its ``n`` *candidates*: resident tokens of earlier chunks (never the chunk just
committed) that no policy had protected at an earlier selection (``view.pinned``). Tokens that another
policy protects now (an attention sink) are kept anyway: protect beats drop.

The draw depends only on ``seed``, the chunk index and the sample's own resident tokens, never on the
batch or on earlier draws, so a run is reproducible and a batched run equals running each sample alone.

Use it as a control for pruning policies (TokenTrim drops about 10% of the spatial positions when it
triggers): ``random-drop:fraction=0.1`` removes as many tokens, but blindly.

This module is what the entry point names. ``cachepolicy plugins`` imports it without importing torch:
torch is imported inside the hook, when a rollout actually runs.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, ClassVar

import attrs

from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import Policy, Selection, finite_float, non_negative_int

if TYPE_CHECKING:  # only for type checkers: keeps discovery free of heavy imports
    from cachepolicy.cache import CacheView
    from cachepolicy.engine import Session

__all__ = ["RandomDrop", "cachepolicy_policies"]


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit generator seed for ``(seed, chunk)``, the same on every machine and Python version."""
    digest = hashlib.blake2b(f"random-drop:{seed}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@attrs.frozen
class RandomDrop(Policy):
    """Drop a random ``fraction`` of the unprotected context tokens of earlier chunks, per chunk.

    Attributes:
        fraction: share of the candidate tokens dropped at each chunk, in [0, 1].
        seed: seed of the draws (combined with the chunk index).
    """

    name: ClassVar[str] = "random-drop"
    summary: ClassVar[str] = "drop a random fraction of older context tokens (a control)"

    fraction: float = attrs.field(default=0.1, validator=finite_float(0.0, 1.0))
    seed: int = attrs.field(default=0, validator=non_negative_int)

    @hookimpl
    def cachepolicy_select(self, session: Session, view: CacheView) -> Selection:
        import torch

        drop = torch.zeros_like(view.valid)
        # Candidates: resident, committed before the current chunk, not pinned by an earlier selection.
        candidates = view.valid & (view.chunk < session.chunk) & ~view.pinned
        for b in range(view.batch_size):
            length = int(view.valid[b].sum())  # this sample's resident tokens, independent of the batch
            generator = torch.Generator("cpu").manual_seed(chunk_seed(self.seed, session.chunk))
            scores = torch.rand(length, generator=generator).to(view.valid.device)
            mine = candidates[b, :length]
            count = round(self.fraction * int(mine.sum()))
            if count == 0:
                continue
            scores = scores.masked_fill(~mine, float("inf"))  # non-candidates are never chosen
            chosen = torch.topk(scores, count, largest=False).indices
            drop[b, chosen] = True
        return Selection(drop=drop)


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    """Discovery hook: the policy classes this distribution provides."""
    return [RandomDrop]
