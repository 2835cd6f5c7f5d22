"""SkyReels-V2's diffusion forcing with a KV cache (a recipe with :class:`~cachepolicy.recipes.Stagger`).

Read from diffusers 0.42.1 ``pipelines/skyreels_v2/pipeline_skyreels_v2_diffusion_forcing.py``
(``SkyReelsV2DiffusionForcingPipeline``: ``generate_timestep_matrix``, the denoising loop, the long-video
iterations) and ``models/transformers/transformer_skyreels_v2.py`` (the causal-block mask); semantics in docs
"Recipes". In blocks of ``F`` frames (one chunk = one causal block), ``n`` UniPC steps:

* **Schedule.** :meth:`Stagger.counters` gives, per model call, each block's step counter; a call denoises
  the blocks whose counter moved and is at most ``n`` (the pipeline's ``step_update_mask``): block ``b`` is
  ``ar_step`` steps behind block ``b-1``. Each block has its own UniPC solver (:meth:`Stagger.scheduler`); a
  block enters as its initial noise (use ``0`` of its chunk) and its state stays float32, as the pipeline's
  ``latents``; the model gets it in its dtype.
* **A call** is one forward on the blocks being denoised, each frame at its block's integer timestep, block-
  causal inside the call (``ModelInfo.causal_block_frames`` must be one chunk), attending to every resident
  token: the committed blocks.
* **Why this equals the pipeline.** The pipeline runs the transformer on the whole current iteration
  (``valid_interval`` is always all of it) under the causal-block mask: a frame sees its block and the earlier
  ones. Blocks after the denoised ones (not started, at timestep 999) are therefore invisible to them and are
  left out here. Blocks before them are finished and fed clean at timestep 0; since every block before a
  finished block is finished too, their keys and values do not change from one call to the next: they are
  exactly what one clean context pass at timestep 0 over the finished blocks computes, which is what the
  cache holds. So a finished block is committed after the call of its last step and before the next call
  (``candidate_ready``, ``before_commit``, context pass at ``context_noise = 0``, selection, ``chunk_end``:
  :func:`cachepolicy.loops.commit_chunk`). The context pass of the last blocks is one the pipeline does not
  need (it returns); it changes no output.
* **UniPC in place.** The pipeline passes each frame's latent to its solver as a view of ``latents`` and
  writes the solver's output back through that view. At a solver's first step UniPC keeps the sample it was
  given as ``last_sample`` (at later steps it keeps the corrected sample, a new tensor), so the corrector at a
  block's second step reads the block's *current* latent where UniPC means its initial noise. SkyReels'
  official loop does the same (``latents[0][:, idx] = ...step(..., latents[0][:, idx])`` with its own copy of
  the solver). Each block's state is updated in place here so that its solver sees what the pipeline's does.
* **Long videos.** The recipe's :class:`~cachepolicy.recipes.Restart` is the pipeline's iterations
  (``base_num_frames``, ``overlap_history`` in latent frames, one chunk of overlap): iterations are run one
  after the other; a later iteration's first new chunk restarts the cache in ``begin_chunk`` (cleared, the
  overlap chunk committed clean at RoPE positions ``0 ..``), and its overlap block counts as finished from
  the start (``num_pre_ready``). RoPE positions restart with each iteration, as the pipeline's
  window-relative positions.

Hooks: ``chunk_start(b)`` before the first call whose first denoised block is ``b``; ``after_step`` once per
call for that block, with ``step`` = its step index; ``candidate_ready`` with its final latent (the UniPC
output of its last step) before it is committed. A :class:`~cachepolicy.policy.PruneRequest` from either
prunes the cache and re-runs the call with the same inputs (solver states are advanced only once a call is
accepted). With ``ar_step = 0`` all blocks of an iteration finish in the same call: the later ones are
committed after the first, each with ``chunk_start`` and ``candidate_ready``; a prune request there is refused
(the call cannot be re-run once a block of it is committed).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from cachepolicy.chunk import Candidate, ChunkBook, StepOutput
from cachepolicy.errors import RolloutConfigError
from cachepolicy.loops import commit_chunk

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UniPCMultistepScheduler

    from cachepolicy.engine import Session


def iterations(num_chunks: int, frames_per_chunk: int, rollout_frames: int | None,
               overlap_frames: int) -> list[tuple[int, int, int]]:
    """The long-video iterations as ``(first chunk, finished leading blocks, blocks)``: the first iteration
    ``(0, 0, min(num_chunks, rollout_frames / F))``; each later one starts one chunk (the overlap) before its
    new chunks. ``rollout_frames`` None: one iteration of every chunk."""
    if rollout_frames is None:
        return [(0, 0, num_chunks)]
    first = rollout_frames // frames_per_chunk
    per = (rollout_frames - overlap_frames) // frames_per_chunk
    out = [(0, 0, min(num_chunks, first))]
    start = first
    while start < num_chunks:
        out.append((start - 1, 1, 1 + min(per, num_chunks - start)))
        start += per
    return out


def run_stagger(session: Session) -> None:
    """Generate ``session.config.num_chunks`` chunks with SkyReels-V2's staggered diffusion forcing."""
    recipe = session.recipe
    if recipe is None or recipe.stagger is None:
        raise RolloutConfigError("run_stagger needs a recipe with a stagger (Recipe.stagger)")
    stagger = recipe.stagger  # checked by Session.check (Stagger.check) before anything ran
    restart = recipe.restart
    plan = iterations(session.config.num_chunks, session.model.frames_per_chunk,
                      None if restart is None else restart.rollout_frames,
                      0 if restart is None else restart.overlap_frames)
    template = stagger.scheduler()
    for origin, ready, count in plan:
        _run_iteration(session, template, origin, ready, count)


def _run_iteration(session: Session, template: UniPCMultistepScheduler, origin: int, ready: int,
                   count: int) -> None:
    """Denoise blocks ``origin + ready .. origin + count - 1`` (chunks), the first ``ready`` being finished."""
    stagger = session.recipe.stagger
    frames, batch, dtype = session.model.frames_per_chunk, session.batch_size, session.cache.dtype
    last = stagger.steps
    timesteps = template.timesteps  # int64, as the pipeline hands them to the solver
    books: dict[int, ChunkBook] = {}
    state: dict[int, torch.Tensor] = {}  # float32 [B, C, F, H, W] per block being denoised
    solvers: dict[int, UniPCMultistepScheduler] = {}
    previous = [last + 1] * ready + [0] * (count - ready)
    first = -1
    rows = stagger.counters(count, ready)
    for index in session.chunk_indices(len(rows), "calls"):
        row = rows[index]
        active = [b for b in range(count) if row[b] != previous[b] and row[b] <= last]
        for b in active:
            if previous[b] == 0:  # enters as its initial noise
                books[b] = session.new_book(origin + b)
                state[b] = books[b].draw(0).float()
                solvers[b] = copy.deepcopy(template)
        head = active[0]
        if head != first:
            session.begin_chunk(origin + head, books[head])
            first = head
        book = books[head]
        finals = [b for b in active if row[b] == last]
        x = torch.cat([state[b] for b in active], dim=2).to(dtype)
        t = torch.tensor([float(timesteps[row[b] - 1]) for b in active for _ in range(frames)])
        t = t.unsqueeze(0).expand(batch, -1).contiguous()
        step = row[head] - 1
        while True:  # a prune request re-runs the call with the same inputs
            velocity = session.forward(book, x, t, phase="step", step=step)
            parts = dict(zip(active, velocity.split(frames, dim=2)))
            sigma = solvers[head].sigmas[step]  # float32, as UniPC's convert_model_output
            x0 = (state[head] - sigma * parts[head].float()).to(dtype)
            output = StepOutput(book.chunk, book.attempt, step, last, float(timesteps[step]), float(sigma),
                                book.frame_start, x[:, :, :frames], parts[head], x0, book.active,
                                session.cache.view())
            if session.after_step(book, output):
                continue
            stepped = {b: copy.deepcopy(solvers[b]) for b in active}
            following = {b: stepped[b].step(parts[b], timesteps[row[b] - 1], state[b], return_dict=False)[0]
                         for b in active}
            candidate: Candidate | None = None
            if head in finals:
                candidate = session.candidate(book, following[head].to(dtype))
                if session.candidate_ready(book, candidate):
                    continue
            break
        solvers.update(stepped)
        for b in active:  # in place, as the pipeline's latents[:, :, idx] = step(..., latents[:, :, idx]) (docstring)
            state[b].copy_(following[b])
        previous = list(row)
        window = [origin + active[0], origin + active[-1]]
        for b in finals:
            if b != head:  # ar_step = 0: blocks finished in the same call, committed in order
                session.begin_chunk(origin + b, books[b])
                first = b
                candidate = session.candidate(books[b], following[b].to(dtype))
                if session.candidate_ready(books[b], candidate):
                    raise RolloutConfigError(
                        f"a policy asked to re-run chunk {origin + b}, which finished in the same call as chunk "
                        f"{origin + head} (ar_step=0): that call cannot be re-run once chunk {origin + head} is "
                        f"committed; use ar_step >= 1 with policies that prune and restart"
                    )
            books[b].record["window_blocks"] = window
            commit_chunk(session, books[b], candidate)
            del books[b], state[b], solvers[b]
