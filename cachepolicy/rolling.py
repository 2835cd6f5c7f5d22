"""Rolling Forcing's joint rolling window (a recipe with :class:`~cachepolicy.recipes.Rolling`).

Read from TencentARC/RollingForcing@a1477d0 (``pipeline/rolling_forcing_inference.py``,
``wan/modules/causal_model.py``); semantics in docs "Recipes". In frames, with ``F`` frames per block,
``nb`` blocks and ``W`` denoising steps (warped timesteps ``t_0 = 1000 > ... > t_{W-1}``):

* Windows ``w = 0 .. nb + W - 2`` cover blocks ``first = max(0, w-W+1) .. last = min(nb-1, w)``; block
  ``b`` is at step ``w - b``. One model call per window on all its blocks (per-frame timesteps), no mask
  inside the window. Block ``b`` enters as fresh noise when ``w == b``, else as its re-noised state;
  ``x0 = x - sigma * v`` (float64); a block before its last step is re-noised to the next step with fresh
  noise; the block at its last step (the window's first block once ``w >= W-1``) is final.
* Keys of the window call with first block ``f``: ``f == 0``: only its own. ``f >= 1``: the anchor (the
  first ``anchor_frames`` frames, stored raw) re-rotated to positions ``F*f - F*n_work - anchor_frames ..``,
  the committed blocks ``max(1, f - n_work) .. f - 1`` (``n_work`` as many as fit in
  ``max_attention_frames`` next to the anchor and the window) at their positions, and its own keys.
* After each window with ``w >= W-1`` its final block ``f`` is committed: ``candidate_ready``,
  ``before_commit``, a clean context pass that sees the last ``max_attention_frames`` frames ending with
  ``f`` (the anchor at its own positions while it is among them), selection and compaction, ``chunk_end``
  -- the chunk loop's own commit (:func:`cachepolicy.loops.commit_chunk`).

Hooks: ``chunk_start(f)`` before the first window whose first block is ``f``; ``after_step`` once per
window for its first block, with ``step`` = that block's step index; ``candidate_ready`` for the final
block. A :class:`~cachepolicy.policy.PruneRequest` from either prunes the cache (protected tokens stay)
and re-runs the window with the same inputs and noise, at most ``max_restarts`` times per policy and
sample. Noise: block ``b`` draws its initial noise, its re-noising for step ``i`` and its context noise as
uses ``0``, ``i`` and ``W`` of chunk ``b`` (:mod:`cachepolicy.noise`), as the per-chunk loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachepolicy.chunk import ChunkBook, StepOutput
from cachepolicy.errors import RolloutConfigError
from cachepolicy.loops import commit_chunk

if TYPE_CHECKING:
    from cachepolicy.cache import CacheView
    from cachepolicy.engine import Session
    from cachepolicy.recipes import Rolling


def window_keys(rolling: Rolling, view: CacheView, first: int, num_blocks: int,
                frames_per_chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(visible [B, S], rope_positions [B, S] or None)`` of the resident tokens a window call with first
    block ``first`` and ``num_blocks`` blocks attends to."""
    frames = frames_per_chunk
    if first == 0:  # the window attends only to itself
        return torch.zeros_like(view.valid), None
    n_work = rolling.working_blocks(first, num_blocks, frames)
    anchor = view.frame < rolling.anchor_frames
    working = (view.frame >= frames * max(1, first - n_work)) & (view.frame < frames * first)
    visible = view.valid & (anchor | working)
    anchor_start = frames * first - frames * n_work - rolling.anchor_frames
    positions = torch.where(anchor, anchor_start + view.frame, view.rope_pos)
    return visible, positions


def context_keys(rolling: Rolling, view: CacheView, block: int, frames_per_chunk: int) -> torch.Tensor:
    """``visible [B, S]`` of the context pass of ``block``: the last ``max_attention_frames`` frames
    ending with the block (the original's ``extract_cache_start = max(0, local_end - 21 frames)``)."""
    return view.valid & (view.frame >= frames_per_chunk * (block + 1) - rolling.max_attention_frames)


def run_rolling(session: Session) -> None:
    """Generate ``session.config.num_chunks`` blocks with Rolling Forcing's rolling window."""
    recipe = session.recipe
    if recipe is None or recipe.rolling is None:
        raise RolloutConfigError("run_rolling needs a recipe with a rolling window (Recipe.rolling)")
    rolling = recipe.rolling
    if session.cache.rope_mode != "raw":
        raise RolloutConfigError("Rolling Forcing re-rotates its anchor: it needs a cache with rope_mode='raw'")
    if session.sampler.noise != "fresh":
        raise RolloutConfigError("Rolling Forcing re-noises every block with fresh noise; "
                                 "Sampler(noise='predicted') is not supported with a rolling window")
    if session.config.prompt_switches:
        raise RolloutConfigError("prompt switches are not supported with Rolling Forcing's rolling window")
    frames = session.model.frames_per_chunk
    sigmas = session.sampler.sigmas()
    timesteps = session.sampler.timesteps()
    num_steps = len(sigmas)
    num_blocks = session.config.num_chunks
    batch = session.batch_size

    books: dict[int, ChunkBook] = {}  # per block in the window: its noise, and once first, its bookkeeping
    state: dict[int, torch.Tensor] = {}  # the input of block b in its next window
    for w in session.chunk_indices(num_blocks + num_steps - 1, "windows"):
        first, last = max(0, w - num_steps + 1), min(num_blocks - 1, w)
        blocks = list(range(first, last + 1))
        if w < num_blocks:
            books[w] = session.new_book(w)
            state[w] = books[w].draw(0)
        book = books[first]
        if w == 0 or w >= num_steps:  # a new first block: its chunk starts
            session.begin_chunk(first, book)
        steps = [w - b for b in blocks]
        final = steps[0] == num_steps - 1
        x = torch.cat([state[b] for b in blocks], dim=2)
        t = torch.tensor([timesteps[i] for i in steps for _ in range(frames)], dtype=torch.float32)
        t = t.unsqueeze(0).expand(batch, -1).contiguous()
        while True:  # a prune request re-runs the window with the same inputs
            visible, positions = window_keys(rolling, session.cache.view(), first, len(blocks), frames)
            velocity = session.forward(book, x, t, phase="step", step=steps[0], visible=visible,
                                       rope_positions=positions)
            x0s = []
            for j, (b, i) in enumerate(zip(blocks, steps)):
                part = slice(j * frames, (j + 1) * frames)
                x0s.append((x[:, :, part].double() - sigmas[i] * velocity[:, :, part].double()).to(x.dtype))
            output = StepOutput(first, book.attempt, steps[0], num_steps, timesteps[steps[0]], sigmas[steps[0]],
                                book.frame_start, x[:, :, :frames], velocity[:, :, :frames], x0s[0], book.active,
                                session.cache.view())
            if session.after_step(book, output):
                continue
            if final:
                candidate = session.candidate(book, x0s[0])
                if session.candidate_ready(book, candidate):
                    continue
            break
        for j, (b, i) in enumerate(zip(blocks, steps)):
            if i + 1 < num_steps:
                following = sigmas[i + 1]
                state[b] = ((1.0 - following) * x0s[j].float()
                            + following * books[b].draw(i + 1).float()).to(x.dtype)
        if final:
            book.record["window_blocks"] = [first, last]
            visible = context_keys(rolling, session.cache.view(), first, frames)
            commit_chunk(session, book, candidate, visible=visible)
            del state[first], books[first]
