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

``--extended`` runs the study of pruning variants instead (``docs/drift-lab.md``, "Fault injection on the drift
lab"); one command, about 30 minutes on one CPU thread with 16 samples::

    python benchmarks/fault_study.py --lab cachepolicy/lab/weights --extended --seeds 16

* latent faults (``--window`` x ``--window`` tokens, noise of each ``--scales``) at chunk K, placed per sample
  from the clean run: on the moving sprites (the window with the most latent change within chunk K) or on
  the static background (the window with the least change over the whole clean video); and one in the sink
  (chunk 0, background window, largest scale) under ``attention-sink:frames=3+sliding-window:frames=6``;
* for each: the fault alone, the fault + ``tokentrim`` (defaults) and the fault + ``--variant``
  (default ``outlier-trim``); MAD to the clean run over the chunks after the fault, with 95% t intervals
  and the paired differences from the fault alone;
* clean runs with each policy: false triggers per sample and their cost (MAD to the untrimmed clean run).

A Markdown table is printed (``--json``: machine-readable; ``--plots DIR``: PNGs; ``--from-json FILE``: the
table and plots of a saved ``--json`` report, without running).

``tiny-wan`` has random weights: this is a mechanism check (does the detector see the corrupted positions,
does pruning change what follows), not a quality result. ``--lab DIR`` runs the same study on a drift-lab
model (``cachepolicy.lab``, trained here, with real dynamics), e.g. ``--lab /work/lab-runs/exp1/final``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import attrs
import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.engine import RolloutConfig, RolloutResult, Session
from cachepolicy.models import Sampler
from cachepolicy.hookspecs import hookimpl
from cachepolicy.plugins.fault import Fault, corrupt, latent_patches, patches_latent
from cachepolicy.policy import Policy, build_policies
from cachepolicy.registry import discover
from cachepolicy.stats import mean_ci, paired_difference

logger = logging.getLogger("fault_study")


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


# --------------------------------------------------------------------------------------------------
# --extended: pruning variants against latent faults placed per sample
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class PlacedFault(Fault):
    """``fault`` with ``target=latent`` whose positions are given per sample (``per_sample[b]``: spatial indices).

    The noise is drawn as ``fault`` draws it (a generator per sample seeded by ``seed``, the sample's rollout
    seed and the target), so a batched run equals each sample run alone.
    """

    per_sample: tuple[tuple[int, ...], ...] = attrs.field(default=(), converter=lambda v: tuple(map(tuple, v)))

    @hookimpl
    def cachepolicy_before_commit(self, session, candidate) -> torch.Tensor | None:
        """Return chunk K's latent ``[B, C, F, H, W]`` with each sample's patches corrupted."""
        if candidate.chunk != self.chunk:
            return None
        latent = candidate.x0
        tokens = latent_patches(latent, session.model)
        state = self.state(session)
        for b in range(latent.shape[0]):
            positions = torch.tensor(self.per_sample[b], dtype=torch.long, device=latent.device)
            tokens[b, positions] = corrupt(tokens[b, positions], self.mode, self.scale, self._generator(session, b))
            state["faulted"][b] = sorted(self.per_sample[b])
        return patches_latent(tokens, session.model)


def token_motion(adapter, latents: torch.Tensor) -> torch.Tensor:
    """``[B, T-1, N]``: per token, the L1 change of the latent from each frame to the next (latent units)."""
    grid = adapter.token_grid(latents)  # [B, T, N, D]
    return (grid[:, 1:] - grid[:, :-1]).abs().sum(-1)


def best_window(energy: torch.Tensor, rows: int, cols: int, size: int, most: bool) -> list[tuple[int, ...]]:
    """Per sample, the ``size`` x ``size`` window of tokens with the most (``most``) or least summed ``energy``
    ``[B, N]``; ties go to the lower top-left index. Returns the windows' sorted spatial indices."""
    windows = []
    grid = energy.reshape(energy.shape[0], rows, cols)
    for b in range(grid.shape[0]):
        scores = [(float(grid[b, r:r + size, c:c + size].sum()), r * cols + c)
                  for r in range(rows - size + 1) for c in range(cols - size + 1)]
        pick = min(scores, key=lambda x: (-x[0] if most else x[0], x[1]))[1]
        r0, c0 = divmod(pick, cols)
        windows.append(tuple(sorted((r0 + i) * cols + c0 + j for i in range(size) for j in range(size))))
    return windows


def run_policies(adapter, policies: list[Policy], chunks: int, seeds: list[int], sampler) -> RolloutResult:
    config = RolloutConfig(num_chunks=chunks, prompts=[PROMPTS.get(s, f"a scene number {s}") for s in seeds],
                           seeds=seeds, sampler=sampler)
    started = time.perf_counter()
    result = Session(adapter, policies, config).run()
    logger.info("rollout %s: %.1f s", "+".join(p.spec for p in policies) or "clean", time.perf_counter() - started)
    return result


def detection(result: RolloutResult, fault_chunk: int, faulted: list[tuple[int, ...]]) -> dict[str, Any]:
    """Triggers at chunks K+1..K+2, precision/recall of the positions pruned there, and the pruned count."""
    window = [r for r in result.trace if fault_chunk + 1 <= r["chunk"] <= fault_chunk + 2]
    triggered, precision, recall, size = [], [], [], []
    for b, positions in enumerate(faulted):
        pruned = set().union(*(set(r["pruned_positions"][b]) for r in window)) if window else set()
        triggered.append(float(any(r["triggered"][b] for r in window)))
        if pruned:
            precision.append(len(pruned & set(positions)) / len(pruned))
            size.append(float(len(pruned)))
        recall.append(len(pruned & set(positions)) / len(positions))
    return {"trigger_within_2": mean(triggered), "precision": mean(precision), "recall": mean(recall),
            "pruned_tokens": mean(size)}


def false_triggers(result: RolloutResult, after: int) -> list[float]:
    """Per sample, the chunks after ``after`` whose first attempt triggered."""
    return [float(sum(bool(r["triggered"][b]) for r in result.trace if r["chunk"] > after))
            for b in range(result.latents.shape[0])]


def extended_study(adapter, registry, args, clean: RolloutResult) -> dict[str, Any]:
    """The --extended study (see the module docstring); returns the report's ``clean`` and ``faults`` rows."""
    seeds = list(range(args.seed, args.seed + args.seeds))
    chunks, K, F = args.chunks, args.fault_chunk, adapter.info.frames_per_chunk
    rows, cols = adapter.info.token_rows, adapter.info.token_cols
    arms = {"tokentrim": "tokentrim", "variant": args.variant}

    def run(spec: str, extra: list[Policy] = ()) -> RolloutResult:
        return run_policies(adapter, (build_policies(spec, registry.policies) if spec else []) + list(extra),
                            chunks, seeds, args.sampler)

    def mad_ci(result: RolloutResult, reference: RolloutResult, start: int) -> tuple[list[float], dict]:
        values = mad(result.latents, reference.latents, start)
        return values, mean_ci(values)

    report: dict[str, Any] = {"clean": [], "faults": []}
    warm = 2  # the first chunk that can trigger is 3 with both policies' defaults
    for arm, spec in arms.items():
        result = run(spec)
        trig = false_triggers(result, warm)
        _, cost = mad_ci(result, clean, 0)
        report["clean"].append({"policy": spec, "arm": arm, "false_triggers": mean_ci(trig),
                                "false_triggers_total": sum(trig), "cost_mad": cost})

    motion = token_motion(adapter, clean.latents)  # [B, T-1, N]; frame f -> f+1 at index f
    placements = {
        "sprite": best_window(motion[:, K * F - 1:(K + 1) * F - 1].sum(1), rows, cols, args.window, most=True),
        "background": best_window(motion.sum(1), rows, cols, args.window, most=False),
    }
    cases = [(where, scale, K, "", clean) for where in ("sprite", "background") for scale in args.scales]
    sink_clean = run(args.sink_spec)
    sink_motion = token_motion(adapter, sink_clean.latents)
    placements["sink"] = best_window(sink_motion.sum(1), rows, cols, args.window, most=False)
    cases.append(("sink", max(args.scales), 0, args.sink_spec, sink_clean))
    for where, scale, chunk, base, reference in cases:
        positions = placements[where]
        fault = PlacedFault(chunk=chunk, target="latent", mode="noise", scale=scale, seed=args.seed,
                            per_sample=positions)
        start = (chunk + 1) * F
        alone = run(base, [fault])
        row: dict[str, Any] = {"where": where, "scale": scale, "fault_chunk": chunk, "base": base or "full",
                               "positions": [list(p) for p in positions]}
        alone_values, row["mad_fault"] = mad_ci(alone, reference, start)
        for arm, spec in arms.items():
            result = run(f"{base}+{spec}" if base else spec, [fault])
            values, row[f"mad_{arm}"] = mad_ci(result, reference, start)
            row[f"diff_{arm}"] = paired_difference(values, alone_values)
            row[f"detect_{arm}"] = detection(result, chunk, positions)
        report["faults"].append(row)
    return report


def ci(stat: dict[str, Any], digits: int = 3) -> str:
    """``mean [low, high]`` of a :func:`mean_ci` or :func:`paired_difference` result."""
    if stat.get("mean") is None:
        return "-"
    if stat.get("ci_low") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['ci_low']:.{digits}f}, {stat['ci_high']:.{digits}f}]"


def extended_table(report: dict[str, Any], variant: str) -> str:
    """The --extended report as Markdown tables."""
    lines = [f"Latent faults (MAD to the clean run over the chunks after the fault; 95% t intervals; "
             f"n = {report['faults'][0]['mad_fault']['n']} samples); variant: `{variant}`", "",
             "| fault | scale | MAD fault | MAD fault + tokentrim | MAD fault + variant | variant - fault "
             "(paired) | tokentrim - fault (paired) | triggers K+1..K+2 tt / var | precision tt / var | "
             "recall tt / var | pruned tokens tt / var |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["faults"]:
        tt, var = row["detect_tokentrim"], row["detect_variant"]

        def pair(key: str) -> str:
            return f"{fmt(tt[key])} / {fmt(var[key])}"

        where = "sink (chunk 0)" if row["where"] == "sink" else row["where"]
        lines.append(f"| {where} | {row['scale']:g} | {ci(row['mad_fault'])} | {ci(row['mad_tokentrim'])} | "
                     f"{ci(row['mad_variant'])} | {ci(row['diff_variant'])} | {ci(row['diff_tokentrim'])} | "
                     f"{pair('trigger_within_2')} | {pair('precision')} | {pair('recall')} | "
                     f"{pair('pruned_tokens')} |")
    lines += ["", "Clean runs (no fault): false triggers per sample (chunks 3 on) and their cost (MAD to the "
              "untrimmed clean run, whole video)", "",
              "| policy | false triggers / sample | total | cost: MAD to clean |", "|---|---|---|---|"]
    for row in report["clean"]:
        lines.append(f"| `{row['policy']}` | {ci(row['false_triggers'])} | {row['false_triggers_total']:g} | "
                     f"{ci(row['cost_mad'])} |")
    return "\n".join(lines)


def plot_extended(report: dict[str, Any], out_dir: str) -> list[str]:
    """Write the --extended report's plots as PNGs (matplotlib, Agg) into ``out_dir``; returns their paths.

    ``mad.png``: MAD to the clean run per fault (fault alone, + tokentrim, + variant; bars are means, whiskers
    the 95% t intervals). ``clean.png``: false triggers per sample and their cost on clean runs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = report["faults"]
    labels = [f"{'sink' if r['where'] == 'sink' else r['where']}\nscale {r['scale']:g}" for r in rows]
    arms = [("mad_fault", "fault alone", "#999999"), ("mad_tokentrim", "fault + tokentrim", "#d62728"),
            ("mad_variant", f"fault + {report['variant']}", "#1f77b4")]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    width = 0.27
    for i, (key, name, colour) in enumerate(arms):
        means = [r[key]["mean"] for r in rows]
        errors = [[r[key]["mean"] - r[key]["ci_low"] for r in rows], [r[key]["ci_high"] - r[key]["mean"] for r in rows]]
        ax.bar([x + (i - 1) * width for x in range(len(rows))], means, width, yerr=errors, capsize=2, label=name,
               color=colour)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("MAD to the clean run (latent units)")
    ax.set_title(f"latent faults, {rows[0]['mad_fault']['n']} samples (95% t intervals)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "mad.png")]
    fig.savefig(paths[0])
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.8), dpi=110)
    for ax, key, title in ((axes[0], "false_triggers", "false triggers per sample"),
                           (axes[1], "cost_mad", "cost: MAD to the clean run")):
        stats = [r[key] for r in report["clean"]]
        ax.bar(range(len(stats)), [st["mean"] for st in stats],
               yerr=[[st["mean"] - st["ci_low"] for st in stats], [st["ci_high"] - st["mean"] for st in stats]],
               capsize=3, color=["#d62728", "#1f77b4"][: len(stats)])
        ax.set_xticks(range(len(stats)), [r["policy"] for r in report["clean"]], fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("clean runs (no fault)", fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "clean.png"))
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


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
    parser.add_argument("--extended", action="store_true",
                        help="the pruning-variant study (placed latent faults, scales, sink, clean costs)")
    parser.add_argument("--variant", default="outlier-trim", help="--extended: the policy spec set against tokentrim")
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="--extended: fault scales")
    parser.add_argument("--window", type=int, default=3, help="--extended: side of the faulted token window")
    parser.add_argument("--sink-spec", default="attention-sink:frames=3+sliding-window:frames=6",
                        help="--extended: the cache policies of the sink-fault rows")
    parser.add_argument("--plots", default=None, metavar="DIR", help="--extended: also write PNG plots into DIR")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="--extended: print the table (and --plots) of a saved --json report instead of running")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        with open(args.from_json) as handle:
            saved = json.load(handle)
        print(extended_table(saved, saved["variant"]))
        if args.plots:
            print("plots: " + ", ".join(plot_extended(saved, args.plots)))
        return 0

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
    if args.extended:
        return extended_main(adapter, registry, args, clean, seeds, started)
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


def extended_main(adapter, registry, args, clean: RolloutResult, seeds: list[int], started: float) -> int:
    """Run the --extended study and print its Markdown table (or JSON)."""
    report = extended_study(adapter, registry, args, clean)
    info = adapter.info
    report.update({
        "model": {"name": info.name, "lab": args.lab, "tokens_per_frame": info.tokens_per_frame,
                  "prompts": [PROMPTS.get(s) for s in seeds]},
        "chunks": args.chunks, "fault_chunk": args.fault_chunk, "seeds": seeds, "variant": args.variant,
        "window": args.window, "scales": args.scales, "sink_spec": args.sink_spec,
        "sampler": args.sampler.to_json(), "seconds": time.perf_counter() - started,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    })
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    what = f"drift-lab model {args.lab}" if args.lab else f"tiny-wan (random weights, seed {args.model_seed})"
    print(f"fault study (--extended) on {what}, {info.token_rows}x{info.token_cols} tokens/frame, {args.chunks} "
          f"chunks, latent faults of {args.window}x{args.window} tokens at chunk {args.fault_chunk} (sink: chunk 0 "
          f"under {args.sink_spec}); {len(seeds)} samples\n")
    print(extended_table(report, args.variant))
    if args.plots:
        print("plots: " + ", ".join(plot_extended(report, args.plots)))
    print(f"\n({report['seconds']:.1f} s, {torch.get_num_threads()} thread(s))")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO if "--verbose" in sys.argv else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(main([a for a in sys.argv[1:] if a != "--verbose"]))
