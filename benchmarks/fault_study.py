"""Fault-injection study: does TokenTrim prune what a known fault corrupted?

One command (CPU, about a minute)::

    python benchmarks/fault_study.py            # table
    python benchmarks/fault_study.py --json     # machine-readable

For every fault target (``kv``: the cached K/V of chunk K; ``latent``: chunk K's committed latent) and every
``summary_at`` of TokenTrim, four rollouts with the same seeds are run (a batch of ``--seeds`` samples; a
batched run equals each sample alone):

* ``clean``: no fault, no TokenTrim;  ``clean+tt``: no fault, TokenTrim;
* ``fault``: the fault alone;          ``fault+tt``: the fault and TokenTrim.

Reported per row (means over samples):

* ``trig<=2``: fraction of samples where TokenTrim triggers at chunk K+1 or K+2 (the fault is committed at
  chunk K, so K+1 is the first chunk that can see it);
* ``precision`` / ``recall`` of the positions TokenTrim prunes at chunks K+1..K+2 (union) against the
  faulted positions (precision over the samples that pruned anything);
* ``false trig``: triggers per sample in the clean TokenTrim run (chunks after warm-up);
* ``MAD fault`` / ``MAD fault+tt``: mean |latent - clean latent| over the chunks after K, without and with
  TokenTrim; ``MAD fault+tt vs clean+tt`` uses the clean TokenTrim run as the reference (the fault's effect
  alone, TokenTrim's own false-positive regenerations removed).

``tiny-wan`` has random weights: this is a mechanism check (does the detector see the corrupted positions,
does pruning change what follows), not a quality result. ``--lab DIR`` runs the same study on a drift-lab
model (``cachepolicy.lab``, trained here, with real dynamics), e.g. ``--lab /work/lab-runs/exp1/final``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.engine import RolloutConfig, RolloutResult, Session
from cachepolicy.models import Sampler
from cachepolicy.policy import build_policies
from cachepolicy.registry import discover


PROMPTS: dict[int, str] = {}  # seed -> prompt (filled by main: the drift lab needs prompts of its vocabulary)


def rollout(adapter, registry, spec: str, chunks: int, seeds: list[int], sampler: Sampler | None) -> RolloutResult:
    policies = build_policies(spec, registry.policies) if spec else []
    config = RolloutConfig(num_chunks=chunks, prompts=[PROMPTS.get(s, f"a scene number {s}") for s in seeds],
                           seeds=seeds, sampler=sampler)
    return Session(adapter, policies, config).run()


def mad(a: torch.Tensor, b: torch.Tensor, frame_start: int) -> list[float]:
    """Per-sample mean |a - b| over latent frames ``>= frame_start`` (latent units)."""
    return (a[:, :, frame_start:] - b[:, :, frame_start:]).abs().flatten(1).mean(dim=1).tolist()


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def study_row(adapter, registry, args, target: str, summary_at: str, clean: RolloutResult) -> dict[str, Any]:
    K, chunks, seeds = args.fault_chunk, args.chunks, list(range(args.seed, args.seed + args.seeds))
    fault = (f"fault:chunk={K},rows={args.rows},cols={args.cols},mode={args.mode},scale={args.scale},"
             f"target={target},seed={args.seed}")
    tt = f"tokentrim:p={args.p},lambda={args.lam},summary_at={summary_at}"
    clean_tt = rollout(adapter, registry, tt, chunks, seeds, args.sampler)
    faulty = rollout(adapter, registry, fault, chunks, seeds, args.sampler)
    faulty_tt = rollout(adapter, registry, f"{tt}+{fault}", chunks, seeds, args.sampler)
    F = adapter.info.frames_per_chunk
    start = (K + 1) * F
    window = [r for r in faulty_tt.trace if K + 1 <= r["chunk"] <= K + 2]
    triggered, precision, recall = [], [], []
    for b in range(len(seeds)):
        faulted = set(faulty_tt.trace[K]["faulted_positions"][b])
        pruned = set().union(*(set(r["pruned_positions"][b]) for r in window))
        triggered.append(float(any(r["triggered"][b] for r in window)))
        if pruned:
            precision.append(len(pruned & faulted) / len(pruned))
        recall.append(len(pruned & faulted) / len(faulted) if faulted else 0.0)
    warm = 2  # chunks 0..2 cannot trigger with the default warm-up (two severities needed)
    false_triggers = [sum(r["triggered"][b] for r in clean_tt.trace if r["chunk"] > warm) for b in range(len(seeds))]
    return {
        "target": target,
        "summary_at": summary_at,
        "fault": fault,
        "tokentrim": tt,
        "faulted_tokens": len(faulty_tt.trace[K]["faulted_positions"][0]),
        "unstable_tokens": len(window[0]["pruned_positions"][0]) if window and window[0]["pruned_positions"][0] else None,
        "trigger_within_2": mean(triggered),
        "first_trigger_chunk": [next((r["chunk"] for r in faulty_tt.trace if r["chunk"] > K and r["triggered"][b]), None)
                                for b in range(len(seeds))],
        "precision": mean(precision),
        "recall": mean(recall),
        "false_triggers_clean": mean([float(x) for x in false_triggers]),
        "mad_fault": mean(mad(faulty.latents, clean.latents, start)),
        "mad_fault_tt": mean(mad(faulty_tt.latents, clean.latents, start)),
        "mad_fault_tt_vs_clean_tt": mean(mad(faulty_tt.latents, clean_tt.latents, start)),
        "mad_clean_tt": mean(mad(clean_tt.latents, clean.latents, start)),
        "mad_fault_per_chunk": [mean(mad(faulty.latents[:, :, : (c + 1) * F], clean.latents[:, :, : (c + 1) * F], c * F))
                                for c in range(K + 1, chunks)],
        "mad_fault_tt_per_chunk": [mean(mad(faulty_tt.latents[:, :, : (c + 1) * F], clean.latents[:, :, : (c + 1) * F],
                                            c * F)) for c in range(K + 1, chunks)],
    }


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--model-seed", type=int, default=0, help="tiny-wan weight seed")
    parser.add_argument("--latent", type=int, nargs=2, default=(16, 16), help="latent H W (patch 2: N = H*W/4)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--fault-chunk", type=int, default=4)
    parser.add_argument("--rows", default="2-4")
    parser.add_argument("--cols", default="2-4")
    parser.add_argument("--mode", default="noise", choices=["noise", "constant", "swap"])
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--lam", type=float, default=2.0, help="TokenTrim lambda")
    parser.add_argument("--seeds", type=int, default=4, help="samples (rollout seeds seed..seed+n-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 750, 500, 250], help="denoising steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lab", default=None, metavar="DIR",
                        help="a drift-lab weights directory (config.json + weights.safetensors) instead of tiny-wan")
    parser.add_argument("--lab-steps", type=int, default=None, help="denoising steps for --lab (default: its own)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    registry = discover()
    seeds = list(range(args.seed, args.seed + args.seeds))
    if args.lab:
        import numpy as np

        from cachepolicy.lab.scenes import sample_prompt

        from cachepolicy.adapters.wan.drift_lab import load_drift_lab

        # its own recipe (config.json: steps, shift, re-noising, guidance); --lab-steps replaces the steps
        adapter = load_drift_lab(args.lab, steps=args.lab_steps)
        args.sampler = adapter.info.sampler
        for s in seeds:
            PROMPTS[s] = sample_prompt(np.random.default_rng(s), adapter.lab_config.scene)  # its sprite limit
    else:
        args.sampler = Sampler(denoising_steps=tuple(args.steps))
        adapter = load_tiny_wan(args.model_seed, latent_size=tuple(args.latent), num_layers=args.layers)
    clean = rollout(adapter, registry, "", args.chunks, seeds, args.sampler)
    rows = [study_row(adapter, registry, args, target, summary_at, clean)
            for target in ("kv", "latent") for summary_at in ("first_step", "final")]
    info = adapter.info
    report = {
        "model": {"name": info.name, "seed": None if args.lab else args.model_seed,
                  "latent": [info.latent_height, info.latent_width], "layers": info.num_layers,
                  "tokens_per_frame": info.tokens_per_frame, "prompts": [PROMPTS.get(s) for s in seeds]},
        "chunks": args.chunks, "fault_chunk": args.fault_chunk, "seeds": seeds,
        "sampler": args.sampler.to_json(), "rows": rows, "seconds": time.perf_counter() - started,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    what = f"drift-lab model {args.lab}" if args.lab else f"tiny-wan (random weights, seed {args.model_seed})"
    print(f"fault study on {what}, {info.token_rows}x{info.token_cols} "
          f"tokens/frame, {args.chunks} chunks, fault at chunk {args.fault_chunk}: rows={args.rows} cols={args.cols} "
          f"mode={args.mode} scale={args.scale}; TokenTrim p={args.p} lambda={args.lam}; {len(seeds)} samples")
    header = ["target", "summary_at", "faulted", "trig<=2", "precision", "recall", "false trig",
              "MAD fault", "MAD fault+tt", "MAD fault+tt vs clean+tt", "MAD clean+tt"]
    keys = ["target", "summary_at", "faulted_tokens", "trigger_within_2", "precision", "recall",
            "false_triggers_clean", "mad_fault", "mad_fault_tt", "mad_fault_tt_vs_clean_tt", "mad_clean_tt"]
    table = [header] + [[fmt(row[k]) for k in keys] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("first trigger after the fault, per sample: "
          + "; ".join(f"{r['target']}/{r['summary_at']}: {r['first_trigger_chunk']}" for r in rows))
    print(f"({report['seconds']:.1f} s, {torch.get_num_threads()} thread(s))")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
