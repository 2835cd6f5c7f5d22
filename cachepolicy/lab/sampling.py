"""A simple chunk-by-chunk block-causal sampler for evaluating drift-lab models, and sample grids.

This is the evaluation reference, not the engine: for each chunk it runs the model's sampler (Euler steps
on the flow-matching ODE, or the stochastic sampler that re-noises the predicted ``x0`` with fresh noise),
recomputing the whole clean prefix (timestep 0) at every step under the block-causal mask. Because
the mask is block-causal, the prefix tokens never see the current chunk, so this equals a cached rollout
with the ``full`` policy (keep everything) at absolute frame positions.

Run as a module to sample a trained checkpoint into a PNG grid::

    python -m cachepolicy.lab.sampling --weights DIR --out grid.png --num 6 --chunks 4
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from diffusers import WanTransformer3DModel

from cachepolicy.lab.errors import LabError
from cachepolicy.lab.model import SAMPLER_NOISES, LabConfig, block_causal_mask, chunk_token_timesteps, masked_attention
from cachepolicy.lab.scenes import to_uint8
from cachepolicy.lab.text import embed_prompts

__all__ = ["sample_latents", "sample_video", "save_grid", "sigma_schedule"]

log = logging.getLogger(__name__)


def sigma_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sigmas ``float64 [steps + 1]`` from 1 down to 0: uniform in ``s``, warped by ``shift*s / (1 + (shift-1)*s)``."""
    if not isinstance(steps, int) or steps < 1:
        raise LabError(f"sampler steps must be a positive int, got {steps!r}")
    if shift <= 0:
        raise LabError(f"sampler shift must be positive, got {shift!r}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


@torch.no_grad()
def sample_latents(
    model: WanTransformer3DModel,
    config: LabConfig,
    prompts: Sequence[str],
    num_chunks: int,
    seed: int = 0,
    steps: int | None = None,
    shift: float | None = None,
    guidance: float | None = None,
    noise: str | None = None,
) -> torch.Tensor:
    """Generate latents chunk by chunk.

    Args:
        model: the drift-lab transformer.
        config: its :class:`LabConfig`.
        prompts: ``B`` prompts.
        num_chunks: chunks to generate (any number; beyond ``config.train_chunks`` the model runs at
            frame positions it never saw in training).
        seed: seed of the initial noise (chunk ``k`` draws its noise from ``seed`` and ``k``).
        steps: denoising steps per chunk (default ``config.sampler_steps``).
        shift: schedule shift (default ``config.sampler_shift``).
        guidance: classifier-free guidance scale (default ``config.sampler_guidance``); 1 disables it (one
            forward per step).
        noise: what re-noises between steps (default ``config.sampler_noise``): ``"predicted"``, the Euler
            step ``x <- x + (sigma_next - sigma) * v``; ``"fresh"``, ``x <- (1 - sigma_next) * x0 +
            sigma_next * eps`` with ``x0 = x - sigma * v`` and new noise ``eps`` from the chunk's generator.

    Returns:
        Latents ``float32 [B, C, num_chunks * chunk_frames, h, w]``.
    """
    if num_chunks < 1:
        raise LabError(f"num_chunks must be positive, got {num_chunks}")
    steps = config.sampler_steps if steps is None else steps
    shift = config.sampler_shift if shift is None else shift
    noise = config.sampler_noise if noise is None else noise
    guidance = config.sampler_guidance if guidance is None else float(guidance)
    if noise not in SAMPLER_NOISES:
        raise LabError(f"sampler noise={noise!r} is not allowed; choose one of {', '.join(SAMPLER_NOISES)}")
    sigmas = sigma_schedule(steps, shift)
    b = len(prompts)
    c, f = config.latent.channels, config.chunk_frames
    h, w = config.latent_hw
    tpc = f * h * w
    text = embed_prompts(list(prompts), config.text)
    if guidance != 1.0:
        text = torch.cat([text, torch.zeros_like(text)])
    done = torch.zeros(b, c, 0, h, w)
    for k in range(num_chunks):
        g = torch.Generator().manual_seed(int(seed) * 100_003 + k)
        x = torch.randn(b, c, f, h, w, generator=g)
        mask = block_causal_mask(k + 1, tpc)
        with masked_attention(model, mask):
            for i in range(steps):
                seq = torch.cat([done, x], dim=2)
                chunk_sigmas = torch.zeros(b, k + 1)
                chunk_sigmas[:, k] = float(sigmas[i])
                ts = chunk_token_timesteps(chunk_sigmas, tpc)
                if guidance != 1.0:
                    seq, ts = torch.cat([seq, seq]), torch.cat([ts, ts])
                v = model(seq, ts, text, return_dict=False)[0][:, :, -f:]
                if guidance != 1.0:
                    v_c, v_u = v.chunk(2)
                    v = v_u + guidance * (v_c - v_u)
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                if noise == "fresh" and sigma_next > 0:
                    x0 = x - sigma * v
                    x = (1.0 - sigma_next) * x0 + sigma_next * torch.randn(x.shape, generator=g)
                else:  # Euler; on the last step (sigma_next = 0) both samplers give x0
                    x = x + (sigma_next - sigma) * v
        done = torch.cat([done, x], dim=2)
    return done


def sample_video(model: WanTransformer3DModel, config: LabConfig, prompts: Sequence[str], num_chunks: int,
                 **kwargs: object) -> np.ndarray:
    """Like :func:`sample_latents`, decoded: frames ``float32 [B, T, 3, H, W]`` in ``[-1, 1]`` (clipped)."""
    z = sample_latents(model, config, prompts, num_chunks, **kwargs)
    return config.latent.decode(z).clamp(-1.0, 1.0).numpy()


def save_grid(videos: Sequence[np.ndarray], path: str | Path, scale: int = 8, chunk_frames: int = 3) -> Path:
    """Save videos ``[T, 3, H, W]`` (``[-1, 1]``) as one PNG: one row per video, frames left to right.

    Frames are upscaled ``scale`` times (nearest neighbour); a white column separates chunks of
    ``chunk_frames`` frames and a white row separates videos. Videos may have different lengths.
    """
    if not videos:
        raise LabError("save_grid needs at least one video")
    tiles = [to_uint8(v) for v in videos]
    H, W = tiles[0].shape[1] * scale, tiles[0].shape[2] * scale
    T = max(t.shape[0] for t in tiles)
    gap = 2
    n_gaps = (T - 1) // chunk_frames
    grid = np.full((len(tiles) * (H + gap), T * W + n_gaps * gap, 3), 255, dtype=np.uint8)
    for r, v in enumerate(tiles):
        for t in range(v.shape[0]):
            img = v[t].repeat(scale, axis=0).repeat(scale, axis=1)
            x0 = t * W + (t // chunk_frames) * gap
            grid[r * (H + gap):r * (H + gap) + H, x0:x0 + W] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, grid)
    return path


def _nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` that returns NaN for all-NaN slices without warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: sample prompts into a PNG grid (generated row, then a true scene) and log per-chunk metrics (also as JSON)."""
    from cachepolicy.lab.checkpoint import load_lab_model
    from cachepolicy.lab.metrics import evaluate_video, summarize
    from cachepolicy.lab.scenes import build_scene, parse_prompt, sample_prompt

    ap = argparse.ArgumentParser(prog="python -m cachepolicy.lab.sampling", description=main.__doc__)
    ap.add_argument("--weights", required=True, help="weights directory (config.json + weights.safetensors)")
    ap.add_argument("--file", default="weights.safetensors", help="weights file inside the directory")
    ap.add_argument("--out", required=True, help="PNG path of the grid")
    ap.add_argument("--num", type=int, default=6, help="number of prompts")
    ap.add_argument("--prompt", action="append", default=[], help="prompt (repeatable); else random")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--shift", type=float, default=None)
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: the model's sampler_guidance)")
    ap.add_argument("--noise", choices=SAMPLER_NOISES, default=None,
                    help="sampler re-noising (default: the model's sampler_noise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid-rows", type=int, default=8, help="most prompts shown in the PNG")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    model, config = load_lab_model(args.weights, args.file)
    rng = np.random.default_rng([args.seed, 77])
    prompts = list(args.prompt) or [sample_prompt(rng, config.scene) for _ in range(args.num)]
    for prompt in prompts:  # parsed whole before any sampling: a prompt the grammar refuses names its word
        parse_prompt(prompt)
    videos = sample_video(model, config, prompts, args.chunks, seed=args.seed, steps=args.steps,
                          shift=args.shift, guidance=args.guidance, noise=args.noise)
    rows = []
    per_chunk: list[dict[str, np.ndarray]] = []
    for i, (p, v) in enumerate(zip(prompts, videos)):
        truth = build_scene(p, args.seed + i, config.scene)
        rows += [v, truth.frames]
        m = evaluate_video(v, parse_prompt(p), chunk_frames=config.chunk_frames,
                           sprite_size=config.scene.sprite_size)
        per_chunk.append(summarize(m, config.chunk_frames))
        log.info("%d %r: count err %.2f, colour err %.3f, size err %.2f, bg err %.3f, flicker %.3f",
                 i, p, m["count_error"].mean(), _nanmean(m["colour_error"]), _nanmean(m["size_error"]),
                 _nanmean(m["background_error"]), m["flicker"].mean())
    grid_rows = rows if len(rows) <= 2 * args.grid_rows else rows[: 2 * args.grid_rows]
    log.info("wrote %s", save_grid(grid_rows, args.out, chunk_frames=config.chunk_frames))
    table = {k: _nanmean(np.stack([c[k] for c in per_chunk]), axis=0) for k in per_chunk[0]}
    for k, v in table.items():
        log.info("per-chunk mean %-17s %s", k, " ".join(f"{x:.3f}" for x in v))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"prompts": prompts, "seed": args.seed, "chunks": args.chunks, "steps": args.steps,
         "guidance": config.sampler_guidance if args.guidance is None else args.guidance,
         "noise": args.noise or config.sampler_noise,
         "per_chunk_mean": {k: v.tolist() for k, v in table.items()}}, indent=1))


if __name__ == "__main__":
    main()
