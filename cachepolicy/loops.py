"""Self Forcing's chunk loop: one chunk's data path, top to bottom.

Per chunk ``c`` of ``F = frames_per_chunk`` latent frames (absolute frames ``[c*F, (c+1)*F)``):

1. ``begin_chunk``: a recipe's event (CausVid restart, prompt switch, LongLive re-cache), ``chunk_start``.
2. Noise use 0 is the initial ``x``. For each warped timestep ``sigma_i`` of the sampler: one forward of the
   noisy chunk against the resident cache (its own K/V are written provisionally), ``x0 = x - sigma_i * v``
   in float64, ``after_step``; unless last, re-noise ``x = (1 - sigma_{i+1}) * x0 + sigma_{i+1} * eps`` with
   noise use ``i+1`` (``Sampler(noise="fresh")``), or take the Euler step ``x + (sigma_{i+1} - sigma_i) * v``
   (``noise="predicted"``). A prune request from ``after_step`` or ``candidate_ready`` restarts the chunk from
   its first step with the same noise.
3. :func:`commit_chunk`: ``before_commit``; the context pass makes the clean chunk's K/V resident; ``select``
   composes the policies' keep sets and compacts the cache; the trace record and ``chunk_end``.

Everything here goes through the session's public steps (:class:`cachepolicy.engine.Session`), which Rolling
Forcing's loop (:mod:`cachepolicy.rolling`) shares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cachepolicy.chunk import Candidate, ChunkBook, StepOutput

if TYPE_CHECKING:  # pragma: no cover
    from cachepolicy.engine import Session


def run_chunks(session: Session) -> None:
    """Generate ``session.config.num_chunks`` chunks one after the other."""
    for chunk in session.chunk_indices():
        book = session.begin_chunk(chunk)
        candidate = denoise(session, book)
        while session.candidate_ready(book, candidate):  # a prune request: regenerate with the same noise
            candidate = denoise(session, book)
        commit_chunk(session, book, candidate)


def denoise(session: Session, book: ChunkBook) -> Candidate:
    """Denoise the chunk from its initial noise; a prune request from ``after_step`` restarts it."""
    sampler = session.sampler
    sigmas, timesteps = sampler.sigmas(), sampler.timesteps()
    while True:
        x = book.draw(0)
        for step, (timestep, sigma) in enumerate(zip(timesteps, sigmas)):
            velocity = session.forward(book, x, timestep, phase="step", step=step)
            x0 = (x.double() - sigma * velocity.double()).to(x.dtype)
            output = StepOutput(book.chunk, book.attempt, step, len(sigmas), timestep, sigma, book.frame_start, x,
                                velocity, x0, book.active, session.cache.view())
            if session.after_step(book, output):
                break  # restart from the first step
            if step + 1 < len(sigmas):
                following = sigmas[step + 1]
                if sampler.noise == "fresh":
                    x = ((1.0 - following) * x0.float() + following * book.draw(step + 1).float()).to(x.dtype)
                else:  # re-noise with the predicted noise: the Euler step of the flow ODE
                    x = (x.double() + (following - sigma) * velocity.double()).to(x.dtype)
        else:
            return session.candidate(book, x0)


def commit_chunk(session: Session, book: ChunkBook, candidate: Candidate, *,
                 visible: torch.Tensor | None = None) -> None:
    """Commit a finished chunk: ``before_commit``, the context pass (attending to ``visible`` resident tokens,
    None: all), selection and compaction, the trace record and ``chunk_end``."""
    latent = session.before_commit(book, candidate)
    session.commit(book, latent, visible=visible)
    resolution = session.select(book)
    session.end_chunk(book, resolution)
