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
  -- the engine's own commit (:meth:`Session._commit_chunk`).

Hooks: ``chunk_start(f)`` before the first window whose first block is ``f``; ``after_step`` once per
window for its first block, with ``step`` = that block's step index; ``candidate_ready`` for the final
block. A :class:`~cachepolicy.policy.PruneRequest` from either prunes the cache (protected tokens stay)
and re-runs the window with the same inputs and noise, at most ``max_restarts`` times per policy and
sample. Noise: block ``b`` draws its initial noise, its re-noising for step ``i`` and its context noise as
uses ``0``, ``i`` and ``W`` of chunk ``b`` (:func:`cachepolicy.engine.noise_seed`), as the per-chunk loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from cachepolicy.errors import RolloutConfigError

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
    from cachepolicy.engine import Candidate, StepOutput, call_each

    recipe = session.recipe
    assert recipe is not None and recipe.rolling is not None
    rolling = recipe.rolling
    if session.cache.rope_mode != "raw":
        raise RolloutConfigError("Rolling Forcing re-rotates its anchor: it needs a cache with rope_mode='raw'")
    if session.sampler.noise != "fresh":
        raise RolloutConfigError("Rolling Forcing re-noises every block with fresh noise; "
                                 "Sampler(noise='predicted') is not supported with a rolling window")
    if session.config.prompt_switches:
        raise RolloutConfigError("prompt switches are not supported with Rolling Forcing's rolling window")
    model = session.model
    frames = model.frames_per_chunk
    sigmas = session.sampler.sigmas()
    timesteps = session.sampler.timesteps()
    num_steps = len(sigmas)
    num_blocks = session.config.num_chunks
    batch = session.batch_size

    noises: dict[int, list[torch.Tensor]] = {}
    state: dict[int, torch.Tensor] = {}  # the input of block b in its next window
    # per chunk being finished: [started, forward time, restarts, pruned_by, attempts]
    books: dict[str, Any] = {}

    windows = range(num_blocks + num_steps - 1)
    if session.progress:
        from tqdm.auto import tqdm

        windows = tqdm(windows, desc="windows", unit="window")
    for w in windows:
        first, last = max(0, w - num_steps + 1), min(num_blocks - 1, w)
        blocks = list(range(first, last + 1))
        if w < num_blocks:
            noises[w] = session._noise(w, num_steps + 1)
            state[w] = noises[w][0]
        if w == 0 or w >= num_steps:  # a new first block: its chunk starts
            books = {"started": time.perf_counter(), "timer": [0.0], "attempt": 0, "pruned_by": {},
                     "restarts": {p.spec: [0] * batch for p in session.policies}}
            session.chunk = first
            call_each(session.pm, "cachepolicy_chunk_start", session=session, chunk=first)
        session.chunk = first
        steps = [w - b for b in blocks]
        final = steps[0] == num_steps - 1
        x = torch.cat([state[b] for b in blocks], dim=2)
        t = torch.tensor([timesteps[i] for i in steps for _ in range(frames)], dtype=torch.float32)
        t = t.unsqueeze(0).expand(batch, -1).contiguous()
        restarts, pruned_by = books["restarts"], books["pruned_by"]
        active = torch.ones(batch, dtype=torch.bool)
        while True:
            view = session.cache.view()
            visible, positions = window_keys(rolling, view, first, len(blocks), frames)
            velocity = session._forward(x, t, first * frames, first, False, books["timer"], visible=visible,
                                        rope_positions=positions)
            x0s = []
            for j, (b, i) in enumerate(zip(blocks, steps)):
                part = slice(j * frames, (j + 1) * frames)
                x_b, v_b = x[:, :, part], velocity[:, :, part]
                x0s.append((x_b.double() - sigmas[i] * v_b.double()).to(x.dtype))
            output = StepOutput(first, books["attempt"], steps[0], num_steps, timesteps[steps[0]], sigmas[steps[0]],
                                first * frames, x[:, :, :frames], velocity[:, :, :frames], x0s[0], active,
                                session.cache.view())
            results = call_each(session.pm, "cachepolicy_after_step", session=session, step=output)
            active_next = session._apply_prune_requests(results, restarts, pruned_by)
            if active_next is None and final:
                candidate = Candidate(first, books["attempt"], first * frames, x0s[0], active, session.cache.view(),
                                      session._retries_per_sample(restarts))
                results = call_each(session.pm, "cachepolicy_candidate_ready", session=session, candidate=candidate)
                active_next = session._apply_prune_requests(results, restarts, pruned_by)
            if active_next is None:
                break
            active = active_next
            books["attempt"] += 1

        for j, (b, i) in enumerate(zip(blocks, steps)):
            if i + 1 < num_steps:
                nxt = sigmas[i + 1]
                state[b] = ((1.0 - nxt) * x0s[j].float() + nxt * noises[b][i + 1].float()).to(x.dtype)
        if final:
            record = {"window_blocks": [first, last]}
            visible = context_keys(rolling, session.cache.view(), first, frames)
            session._commit_chunk(first, candidate, noises[first][-1], books["attempt"], restarts, pruned_by, record,
                                  books["timer"], books["started"], visible=visible)
            del state[first], noises[first]
