"""Train the drift-lab model with diffusion forcing on procedural scenes (CPU, resumable).

Objective (per sample of ``train_chunks`` chunks of ``chunk_frames`` latent frames):

- every chunk ``k`` gets its own noise level ``sigma_k`` (logit-normal, optionally shifted);
- with probability ``clean_prefix_prob`` the first ``1..train_chunks-1`` chunks are kept clean
  (``sigma = 0``, the situation of AR inference) and left out of the loss;
- ``x_t = (1 - sigma) * x0 + sigma * eps``; the stock Wan transformer sees per-token timesteps
  ``sigma * 1000`` (shape ``[B, L]``) under the block-causal mask and predicts ``v = eps - x0``;
- loss: mean squared error on ``v`` over the noisy chunks (sprite pixels optionally up-weighted).

Each step's batch and noise are drawn from generators seeded by ``(seed, step)``, so a run is
reproducible from its seed and a resumed run continues exactly where it stopped. Usage::

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 python -m cachepolicy.lab.train \\
        --out runs/drift-lab --seed 0 --steps 7000 --minutes 150 --threads 2

The default recipe (every default of the CLI): 16x16 RGB frames, sprites of 5 px, 1-2 sprites;
latent = pixel-unshuffle by 2 (12 channels on an 8x8 grid), Wan patch ``(1, 1, 1)`` so one token is a
2x2-pixel block (64 tokens per frame); 4 blocks of width 128 (4 heads x 32), FFN 512, text_dim 64
(1.21 M parameters, 4.9 MB in float32); trained context 4 chunks of 3 frames (768 tokens); batch 8,
AdamW 1e-3 with warm-up/stable/decay, EMA 0.999, logit-normal sigmas, half the samples with 1-3 clean
leading chunks, 10 % prompt dropout; sampled with 24 steps per chunk (shift 1) that re-noise the
predicted clean latent with fresh noise, with classifier-free guidance 2 (``config.json``'s
``sampler_*``; ``--sampler-noise predicted --sampler-guidance 1`` is the plain Euler sampler). Measured on this
machine at one thread: 0.78-0.80 steps/s alone, 0.35-0.6 steps/s while other heavy work runs.

Outputs under ``--out``: ``checkpoint/`` (latest, resumable: EMA weights + raw weights + optimizer +
``state.json``), ``final/`` (EMA weights directory loadable by :func:`cachepolicy.lab.checkpoint.load_lab_model`,
with ``train.json`` recording the command and seed), ``samples/step_*.png`` and ``train.log``/``loss.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cachepolicy.lab.checkpoint import load_state_into, save_weights_dir, write_atomically
from cachepolicy.lab.errors import LabCheckpointError, LabError
from cachepolicy.lab.model import (
    SAMPLER_NOISES,
    LabConfig,
    block_causal_mask,
    build_transformer,
    chunk_token_timesteps,
    install_masked_attention,
)
from cachepolicy.lab.scenes import SceneConfig, build_scene, sample_spec
from cachepolicy.lab.text import TextConfig, embed_prompts

__all__ = ["TrainConfig", "make_batch", "sample_sigmas", "train"]

log = logging.getLogger("cachepolicy.lab.train")

#: Set by the CLI's SIGTERM handler: the loop finishes its current step, checkpoints and returns.
_STOP_REQUESTED = threading.Event()


@attrs.frozen
class TrainConfig:
    """Optimisation hyper-parameters (everything that, with the seed, determines the trained weights).

    Attributes:
        steps: schedule length in optimizer steps (the decay ends here; training stops here).
        batch_size: scenes per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        decay_fraction: fraction of ``steps`` (at the end) over which the learning rate decays.
        ema_decay: EMA decay (with the usual ``(1 + n) / (10 + n)`` warm-up).
        grad_clip: max global gradient norm.
        sigma_mean: mean of the logit-normal noise-level distribution.
        sigma_std: std of the logit-normal noise-level distribution.
        sigma_shift: shift applied to sampled sigmas (``s*u / (1 + (s-1)*u)``).
        clean_prefix_prob: probability that a sample keeps 1..C-1 leading chunks clean.
        prompt_dropout: probability that a sample's prompt is replaced by the empty prompt.
        sprite_loss_weight: loss weight of latent positions covering sprite pixels (1 = plain MSE).
    """

    steps: int = 7000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    min_lr_ratio: float = 0.05
    decay_fraction: float = 0.3
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    sigma_shift: float = 1.0
    clean_prefix_prob: float = 0.5
    prompt_dropout: float = 0.1
    sprite_loss_weight: float = 1.0

    def __attrs_post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise LabError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)!r}")
        if self.warmup < 1:
            raise LabError(f"TrainConfig.warmup must be at least 1, got {self.warmup!r}")
        for name in ("lr", "grad_clip", "sigma_std", "sigma_shift", "sprite_loss_weight"):
            if not getattr(self, name) > 0:
                raise LabError(f"TrainConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("min_lr_ratio", "decay_fraction", "clean_prefix_prob", "prompt_dropout", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LabError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate at optimizer step ``step`` (0-based): warm-up, stable, decay.

        Linear warm-up over ``warmup`` steps, constant ``lr`` until the last ``decay_fraction`` of
        ``steps``, then a cosine decay to ``min_lr_ratio * lr``. A run cut short by its time budget
        therefore stops at the constant rate with usable EMA weights, not half-way down a decay.
        """
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        start = max(self.warmup, int(round(self.steps * (1.0 - self.decay_fraction))))
        if step < start:
            return self.lr
        progress = min(1.0, (step - start) / max(1, self.steps - start))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_batch(lab: LabConfig, train_cfg: TrainConfig, seed: int, step: int) -> dict[str, Any]:
    """The training batch of ``step``: a pure function of ``(lab, train_cfg, seed, step)``.

    Returns a dict with ``x0`` latents ``[B, C, T, h, w]``, ``text`` ``[B, L_text, text_dim]``, ``prompts``
    (``""`` where dropped) and ``sprite`` ``float [B, 1, T, h, w]``: 1 where a latent position covers
    any sprite pixel.
    """
    rng = np.random.default_rng([int(seed), int(step), 1])
    frames, prompts, sprite = [], [], []
    for _ in range(train_cfg.batch_size):
        spec = sample_spec(rng, lab.scene)
        scene = build_scene(spec, int(rng.integers(2**31)), lab.scene)
        frames.append(scene.frames)
        sprite.append(scene.sprite_mask)
        prompts.append("" if rng.random() < train_cfg.prompt_dropout else spec.prompt)
    x0 = lab.latent.encode(torch.from_numpy(np.stack(frames)))
    m = torch.from_numpy(np.stack(sprite)).float()  # [B, T, H, W]
    f = lab.latent_factor
    m = torch.nn.functional.max_pool2d(m, f).unsqueeze(1)  # [B, 1, T, h, w]
    return {"x0": x0, "text": embed_prompts(prompts, lab.text), "prompts": prompts, "sprite": m}


def sample_sigmas(train_cfg: TrainConfig, batch: int, chunks: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk noise levels ``[B, C]`` in ``[0, 1]`` and the loss mask ``bool [B, C]`` (False for clean prefixes)."""
    u = torch.sigmoid(train_cfg.sigma_mean + train_cfg.sigma_std * torch.randn(batch, chunks, generator=generator))
    s = train_cfg.sigma_shift
    sig = s * u / (1 + (s - 1) * u)
    in_loss = torch.ones(batch, chunks, dtype=torch.bool)
    if chunks > 1:
        use = torch.rand(batch, generator=generator) < train_cfg.clean_prefix_prob
        k = torch.randint(1, chunks, (batch,), generator=generator)
        prefix = (torch.arange(chunks)[None, :] < k[:, None]) & use[:, None]
        sig = sig.masked_fill(prefix, 0.0)
        in_loss &= ~prefix
    return sig, in_loss


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_samples(ema_model: torch.nn.Module, lab: LabConfig, path: Path, seed: int) -> None:
    from cachepolicy.lab.sampling import sample_video, save_grid

    rng = np.random.default_rng([seed, 12345])
    prompts = [sample_spec(rng, lab.scene).prompt for _ in range(4)]
    videos = sample_video(ema_model, lab, prompts, lab.train_chunks, seed=seed)
    rows = []
    for i, (p, v) in enumerate(zip(prompts, videos)):
        rows += [v, build_scene(p, i, lab.scene).frames]
    save_grid(rows, path, chunk_frames=lab.chunk_frames)
    log.info("samples %s: %s", path.name, " | ".join(prompts))


def train(out: Path, lab: LabConfig, train_cfg: TrainConfig, seed: int, minutes: float | None,
          sample_every: int = 0, checkpoint_every: int = 250, command: str = "", stop_at: int | None = None) -> Path:
    """Train (or resume) into ``out``; stop at ``train_cfg.steps``, at step ``stop_at`` (if given) or after
    ``minutes`` of wall clock, whichever comes first. ``stop_at`` and ``minutes`` only end this invocation:
    they are not part of the run's configuration, so a later call resumes the same run.

    Returns the path of the ``final/`` weights directory (written whenever training stops).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    model = build_transformer(lab, seed=seed)
    install_masked_attention(model)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=(0.9, 0.99),
                            weight_decay=train_cfg.weight_decay)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = 0
    seconds_before = 0.0
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        stored_train = dict(state["train"])
        now_train = attrs.asdict(train_cfg)
        extend_ok = False
        if stored_train.get("steps") != now_train["steps"]:
            # changing the schedule length is allowed while both schedules are still in their constant
            # phase: the learning-rate history so far is then identical, so the run is simply extended
            # (or shortened)
            try:
                old_cfg = TrainConfig(**stored_train)
            except TypeError:
                old_cfg = None
            extend_ok = old_cfg is not None and all(
                old_cfg.lr_at(s) == train_cfg.lr_at(s) for s in range(int(state["step"]))
            )
            if extend_ok:
                log.warning("schedule length changed from %d to %d steps at step %d (still in the constant "
                            "phase): extending the run", stored_train["steps"], now_train["steps"], state["step"])
                stored_train["steps"] = now_train["steps"]
        if state["lab"] != lab.to_dict() or stored_train != now_train or state["seed"] != seed:
            raise LabCheckpointError(
                f"{ckpt} was written with a different configuration or seed; resume with the same arguments "
                f"(stored: seed={state['seed']}, train={state['train']}) or use a new --out; --steps may only "
                f"change while the learning rate is still constant"
            )
        load_state_into(model, load_file(str(ckpt / "model.safetensors")), str(ckpt / "model.safetensors"))
        ema = load_file(str(ckpt / "weights.safetensors"))
        _load_optimizer_state(opt, load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
        step, seconds_before = int(state["step"]), float(state["seconds"])
        log.info("resumed from %s at step %d (%.1f min trained)", ckpt, step, seconds_before / 60)
    else:
        log.info("new run in %s: %d parameters, %d tokens per sample, seed %d", out, n_params,
                 lab.tokens_per_frame * lab.scene.num_frames, seed)
    log.info("lab config: %s", json.dumps(lab.to_dict()))
    log.info("train config: %s", json.dumps(attrs.asdict(train_cfg)))

    ema_model = build_transformer(lab)
    install_masked_attention(ema_model)
    ema_model.eval()
    tpc = lab.tokens_per_frame * lab.chunk_frames
    chunks = lab.train_chunks
    mask = block_causal_mask(chunks, tpc)
    install_masked_attention(model).mask = mask
    f = lab.chunk_frames

    def save(final: bool = False) -> None:
        elapsed = seconds_before + (time.monotonic() - t_start)
        tensors, opt_meta = _optimizer_state(opt)
        state = {"step": step, "seconds": elapsed, "seed": seed, "lab": lab.to_dict(),
                 "train": attrs.asdict(train_cfg), "optimizer": opt_meta, "command": command}
        write_atomically(ckpt, {
            "config.json": json.dumps(lab.to_dict(), indent=2).encode(),
            "weights.safetensors": ema,
            "model.safetensors": {k: v for k, v in model.state_dict().items()},
            "optimizer.safetensors": tensors,
            "state.json": json.dumps(state, indent=2).encode(),
        })
        if final:
            record = {"command": command, "seed": seed, "steps_done": step, "minutes": elapsed / 60,
                      "parameters": n_params, "train": attrs.asdict(train_cfg),
                      "trained_context_chunks": chunks, "last_loss": last_loss}
            save_weights_dir(out / "final", lab, ema, extra={"train.json": json.dumps(record, indent=2).encode()})
            log.info("final EMA weights in %s", out / "final")

    t_start = time.monotonic()
    deadline = None if minutes is None else t_start + 60.0 * minutes
    loss_log = (out / "loss.jsonl").open("a")
    running, running_n, last_loss = 0.0, 0, float("nan")
    t_window, steps_window = time.monotonic(), 0
    model.train()
    with logging_redirect_tqdm():
        bar = tqdm(total=train_cfg.steps, initial=step, desc="drift-lab", unit="step", dynamic_ncols=True)
        try:
            while step < min(train_cfg.steps, stop_at if stop_at is not None else train_cfg.steps):
                if _STOP_REQUESTED.is_set():
                    log.warning("stop requested (SIGTERM) at step %d; saving a checkpoint", step)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    log.info("time budget of %.1f min reached at step %d", minutes, step)
                    break
                batch = make_batch(lab, train_cfg, seed, step)
                g = torch.Generator().manual_seed(_seed(seed, step, 2))
                x0 = batch["x0"]
                b = x0.shape[0]
                sig, in_loss = sample_sigmas(train_cfg, b, chunks, g)
                eps = torch.randn(x0.shape, generator=g)
                s5 = sig.repeat_interleave(f, dim=1)[:, None, :, None, None]  # [B, 1, T, 1, 1]
                xt = (1 - s5) * x0 + s5 * eps
                target = eps - x0
                for group in opt.param_groups:
                    group["lr"] = train_cfg.lr_at(step)
                pred = model(xt, chunk_token_timesteps(sig, tpc), batch["text"], return_dict=False)[0]
                w = in_loss.float().repeat_interleave(f, dim=1)[:, None, :, None, None]
                if train_cfg.sprite_loss_weight != 1.0:
                    w = w * (1 + (train_cfg.sprite_loss_weight - 1) * batch["sprite"])
                w = w.expand_as(pred)
                loss = ((pred - target) ** 2 * w).sum() / w.sum().clamp_min(1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
                if not torch.isfinite(loss):
                    raise LabError(f"non-finite loss {loss.item()} at step {step}")
                opt.step()
                step += 1
                decay = min(train_cfg.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                lv = float(loss.detach())
                running += lv
                running_n += 1
                steps_window += 1
                bar.update(1)
                if step % 25 == 0 or step == train_cfg.steps:
                    now = time.monotonic()
                    rate = steps_window / max(now - t_window, 1e-9)
                    last_loss = running / running_n
                    log.info("step %d loss %.4f lr %.2e gnorm %.2f %.3f steps/s", step, last_loss,
                             train_cfg.lr_at(step - 1), float(gnorm), rate)
                    loss_log.write(json.dumps({"step": step, "loss": last_loss, "lr": train_cfg.lr_at(step - 1),
                                               "steps_per_s": rate,
                                               "minutes": (seconds_before + now - t_start) / 60}) + "\n")
                    loss_log.flush()
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    running, running_n, t_window, steps_window = 0.0, 0, now, 0
                if checkpoint_every and step % checkpoint_every == 0:
                    save()
                if sample_every and step % sample_every == 0:
                    load_state_into(ema_model, ema, "EMA")
                    _save_samples(ema_model, lab, out / "samples" / f"step_{step:06d}.png", seed)
        except KeyboardInterrupt:
            log.warning("interrupted at step %d; saving a checkpoint (resume with the same command)", step)
        finally:
            bar.close()
            loss_log.close()
    save(final=True)
    return out / "final"


def build_configs(args: argparse.Namespace) -> tuple[LabConfig, TrainConfig]:
    """The :class:`LabConfig` and :class:`TrainConfig` that the CLI arguments describe."""
    scene = SceneConfig(num_frames=args.chunks * args.chunk_frames, height=args.size, width=args.size,
                        sprite_size=args.sprite_size, max_sprites=args.max_sprites)
    lab = LabConfig(scene=scene, latent_factor=args.latent_factor, text=TextConfig(), dim_head=args.dim_head,
                    heads=args.heads, layers=args.layers, ffn_dim=args.ffn_dim, chunk_frames=args.chunk_frames,
                    sampler_steps=args.sampler_steps, sampler_shift=args.sampler_shift,
                    sampler_noise=args.sampler_noise, sampler_guidance=args.sampler_guidance)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                     ema_decay=args.ema_decay, sigma_shift=args.sigma_shift,
                     clean_prefix_prob=args.clean_prefix_prob, prompt_dropout=args.prompt_dropout,
                     sprite_loss_weight=args.sprite_loss_weight)
    return lab, tc


def build_parser() -> argparse.ArgumentParser:
    """The training CLI's arguments (defaults: :class:`LabConfig` and :class:`TrainConfig`)."""
    d_lab, d_tc = LabConfig(), TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m cachepolicy.lab.train",
                                 description="Train the drift-lab model (diffusion forcing, resumable).")
    ap.add_argument("--out", required=True, type=Path, help="run directory (resumes if it holds a checkpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=d_tc.steps, help="schedule length and step limit")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock limit of this invocation")
    ap.add_argument("--stop-at", type=int, default=None, help="end this invocation at this step (resumable)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: never)")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    g = ap.add_argument_group("model and data")
    g.add_argument("--size", type=int, default=d_lab.scene.height, help="frame height and width (pixels)")
    g.add_argument("--sprite-size", type=int, default=d_lab.scene.sprite_size)
    g.add_argument("--max-sprites", type=int, default=d_lab.scene.max_sprites)
    g.add_argument("--chunks", type=int, default=d_lab.train_chunks, help="trained context in chunks")
    g.add_argument("--chunk-frames", type=int, default=d_lab.chunk_frames)
    g.add_argument("--latent-factor", type=int, default=d_lab.latent_factor)
    g.add_argument("--heads", type=int, default=d_lab.heads)
    g.add_argument("--dim-head", type=int, default=d_lab.dim_head)
    g.add_argument("--layers", type=int, default=d_lab.layers)
    g.add_argument("--ffn-dim", type=int, default=d_lab.ffn_dim)
    g.add_argument("--sampler-steps", type=int, default=d_lab.sampler_steps)
    g.add_argument("--sampler-shift", type=float, default=d_lab.sampler_shift)
    g.add_argument("--sampler-noise", choices=SAMPLER_NOISES, default=d_lab.sampler_noise,
                   help="re-noising between sampler steps, recorded in config.json (default %(default)s)")
    g.add_argument("--sampler-guidance", type=float, default=d_lab.sampler_guidance,
                   help="classifier-free guidance scale of the sampler, recorded in config.json "
                        "(default %(default)s)")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d_tc.batch_size)
    g.add_argument("--lr", type=float, default=d_tc.lr)
    g.add_argument("--warmup", type=int, default=d_tc.warmup)
    g.add_argument("--ema-decay", type=float, default=d_tc.ema_decay)
    g.add_argument("--sigma-shift", type=float, default=d_tc.sigma_shift)
    g.add_argument("--clean-prefix-prob", type=float, default=d_tc.clean_prefix_prob)
    g.add_argument("--prompt-dropout", type=float, default=d_tc.prompt_dropout)
    g.add_argument("--sprite-loss-weight", type=float, default=d_tc.sprite_loss_weight)
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: ``python -m cachepolicy.lab.train --out DIR --seed S --steps N --minutes M``."""
    args = build_parser().parse_args(argv)

    def _terminate(signum: int, frame: object) -> None:  # a killed background run saves its checkpoint
        _STOP_REQUESTED.set()

    signal.signal(signal.SIGTERM, _terminate)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(args.out / "train.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    lab, tc = build_configs(args)
    command = "python -m cachepolicy.lab.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    train(args.out, lab, tc, args.seed, args.minutes, sample_every=args.sample_every,
          checkpoint_every=args.checkpoint_every, command=command, stop_at=args.stop_at)


if __name__ == "__main__":
    main()
