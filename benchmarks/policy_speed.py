"""Seconds per chunk and cache memory of ``full``, the windows Forcing-KV and Dummy Forcing replace, ``forcing-kv``
and ``dummy-forcing``, side by side in one process, on a random Wan config with the real per-frame token count.

One command::

    python benchmarks/policy_speed.py            # a Markdown table
    python benchmarks/policy_speed.py --json     # a JSON list of objects

Model: a random ``WanTransformer3DModel`` (every parameter drawn from a seeded generator) with Wan2.1-1.3B's
layer shape: 12 heads x 128 (dim 1536), FFN 8960, 16 latent channels, patch 1x2x2, a 60x104 latent (480x832
pixels): **1560 tokens per frame**, 4680 per chunk of 3 frames; ``--layers`` blocks (default 2) instead of 30,
which scales every policy's time alike. One sample, ``--chunks`` chunks (default 10: 30 latent frames, past
Self Forcing's 21-frame window), one denoising step + the context pass per chunk (``--steps``: every forward of a
chunk attends to the same cache, so Self Forcing's 4 steps + the context pass multiply every policy's chunk by
5 / 2 and leave the ratios as they are; a policy's once-per-chunk work weighs a little more with fewer forwards).
The prompt goes through the hashed-word stand-in encoder (16 tokens of ``text_dim``).

Policies (``--policies`` replaces the list; ``;``-separated specs):

* ``full``: every token (Self Forcing's default, ``local_attn_size: -1``);
* ``sliding-window:frames=18``: Self Forcing's 21-frame window (``local_attn_size: 21`` for long videos), the
  baseline Forcing-KV's Self Forcing config replaces;
* ``attention-sink:frames=3+sliding-window:frames=6``: the 12-frame window with a 3-frame sink written in Dummy
  Forcing's config (``local_attn_size: 12``, ``sink_size: 3``; LongLive's);
* ``forcing-kv``: roles with Self Forcing's share of static heads (134 of 360: 4 of 12 per layer from layer 1, the
  first four heads; speed depends on the counts only);
* ``dummy-forcing``: defaults (half of all heads dummy).

``seconds_per_chunk`` is the mean time per chunk over the rollout (every chunk), in process CPU seconds on the CPU
(``--clock cpu``, the default there: with one thread it is the compute the chunk took, whatever else runs on the
machine) or wall seconds (``--clock wall``, the default on CUDA; ``wall_seconds_per_chunk`` is always given);
``speedup_vs_full`` divides ``full``'s by it; ``cache_mb`` is the largest K/V the cache held after a chunk (resident tokens x heads x 128 x
4 bytes x 2, summed over layers and head groups), ``cache_allocated_mb`` the buffers' size. With ``--rounds R``
the policies run ``R`` times interleaved and the medians are reported. Set ``--threads`` (default 1) and
``OMP_WAIT_POLICY=PASSIVE`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_POLICIES = (
    ("full", "baseline"),
    ("sliding-window:frames=18", "Self Forcing's 21-frame window (what forcing-kv replaces)"),
    ("attention-sink:frames=3+sliding-window:frames=6", "the 12-frame window of Dummy Forcing's config"),
    ("forcing-kv:roles={roles}", "static heads 2 frames, dynamic heads 2 frames + 6 segments"),
    ("dummy-forcing", "half the heads 1 frame, the rest sink frame or the last chunk"),
)


def build_model(args: argparse.Namespace) -> Any:
    """The random Wan adapter of the benchmark."""
    from cachepolicy.adapters.wan.adapter import WanAdapter, cast_model
    from cachepolicy.adapters.wan.tiny import HashedWordEncoder, tiny_wan_model
    from cachepolicy.models import Sampler

    model = tiny_wan_model(0, num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16,
                           out_channels=16, text_dim=args.text_dim, freq_dim=256, ffn_dim=args.ffn_dim,
                           num_layers=args.layers)
    model = cast_model(model, args.device, args.dtype)
    steps = tuple(float(s) for s in args.steps.split(","))
    return WanAdapter(model, name="policy-speed", latent_size=tuple(args.latent),
                      text_encoder=HashedWordEncoder(args.text_dim), sampler=Sampler(denoising_steps=steps))


def write_roles(path: Path, num_layers: int, num_heads: int) -> None:
    """Forcing-KV roles with Self Forcing's share of static heads (134 / 360) in every layer."""
    from cachepolicy.calibrate import head_roles_json

    static = round(num_heads * 134 / 360)
    payload = head_roles_json([list(range(static))] * num_layers,
                              [list(range(static, num_heads))] * num_layers, profile="policy-speed",
                              description=f"first {static} heads static in every layer (Self Forcing's share)")
    path.write_text(json.dumps(payload))


def time_policy(adapter: Any, spec: str, chunks: int, prompt: str) -> dict[str, Any]:
    """One rollout under ``spec``: per-chunk wall and process-CPU seconds and the cache it held."""
    from cachepolicy.api import build_policies
    from cachepolicy.engine import RolloutConfig, Session

    session = Session(adapter, build_policies(spec), RolloutConfig(num_chunks=chunks, prompts=[prompt], seeds=[0]))
    held: list[int] = []
    cpu: list[float] = [time.process_time()]

    def on_chunk(record: dict[str, Any]) -> None:
        held.append(session.cache.resident_bytes())
        cpu.append(time.process_time())

    session.on_chunk = on_chunk
    started = time.perf_counter()
    result = session.run()
    total = time.perf_counter() - started
    return {"chunk_seconds": [r["seconds"] for r in result.trace],
            "cpu_seconds": [b - a for a, b in zip(cpu, cpu[1:])],
            "forward_seconds": [r["forward_seconds"] for r in result.trace], "total": total,
            "cache_mb": max(held) / 1e6, "cache_allocated_mb": max(r["cache_bytes"] for r in result.trace) / 1e6,
            "cache_tokens_per_head": result.trace[-1].get("cache_tokens_per_head", result.trace[-1]["cache_tokens"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2; Wan2.1-1.3B has 30)")
    parser.add_argument("--chunks", type=int, default=10, help="chunks per rollout (default 10: 30 latent frames)")
    parser.add_argument("--steps", default="1000",
                        help="denoising steps (default one step: 2 forwards per chunk; Self Forcing's 1000,750,500,250 "
                             "makes every policy's chunk 2.5 times longer)")
    parser.add_argument("--latent", type=int, nargs=2, default=(60, 104), metavar=("H", "W"),
                        help="latent size (default 60 104: 1560 tokens per frame)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn-dim", type=int, default=8960)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--policies", default=None, help="';'-separated specs instead of the default five")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (medians reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="what seconds_per_chunk counts: process CPU time (default on cpu: robust to other "
                             "processes on a shared machine, exact for one thread) or wall time (default on cuda)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    torch.set_grad_enabled(False)
    adapter = build_model(args)
    info = adapter.info
    with tempfile.TemporaryDirectory() as folder:
        roles = Path(folder) / "roles.json"
        write_roles(roles, info.num_layers, info.num_heads)
        if args.policies:
            entries = [(spec.strip(), "") for spec in args.policies.split(";") if spec.strip()]
        else:
            entries = list(DEFAULT_POLICIES)
        specs = [spec.format(roles=roles) for spec, _ in entries]
        runs: dict[str, list[dict[str, Any]]] = {spec: [] for spec in specs}
        time_policy(adapter, "full", 1, "warm-up")  # one-off allocations and kernel set-up, not timed
        for _ in range(args.rounds):
            for spec in specs:
                runs[spec].append(time_policy(adapter, spec, args.chunks, "a red fox runs through fresh snow"))
                print(f"{spec.split(':roles=')[0]}: {statistics.mean(runs[spec][-1]['chunk_seconds']):.2f} s/chunk "
                      f"wall, {statistics.mean(runs[spec][-1]['cpu_seconds']):.2f} CPU", file=sys.stderr, flush=True)
    rows = []
    for (spec, role), text in zip(entries, specs):
        per_round = [statistics.mean(run["cpu_seconds" if clock == "cpu" else "chunk_seconds"]) for run in runs[text]]
        wall = [statistics.mean(run["chunk_seconds"]) for run in runs[text]]
        forward = [statistics.mean(run["forward_seconds"]) for run in runs[text]]
        last = runs[text][-1]
        rows.append({"policy": spec.split(":roles=")[0] if spec.startswith("forcing-kv") else spec,
                     "role": role, "seconds_per_chunk": statistics.median(per_round), "clock": clock,
                     "wall_seconds_per_chunk": round(statistics.median(wall), 3),
                     "forward_wall_seconds_per_chunk": statistics.median(forward),
                     "chunk_seconds": [round(s, 3) for s in last["cpu_seconds" if clock == "cpu" else "chunk_seconds"]],
                     "cache_mb": round(last["cache_mb"], 2), "cache_allocated_mb": round(last["cache_allocated_mb"], 2),
                     "context_tokens_per_head_last_chunk": last["cache_tokens_per_head"]})
    full = next((row["seconds_per_chunk"] for row in rows if row["policy"] == "full"), None)
    for row in rows:
        row["speedup_vs_full"] = round(full / row["seconds_per_chunk"], 3) if full else None
        row["seconds_per_chunk"] = round(row["seconds_per_chunk"], 3)
        row["forward_wall_seconds_per_chunk"] = round(row["forward_wall_seconds_per_chunk"], 3)
    setup = {"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim, "ffn_dim": args.ffn_dim,
             "tokens_per_frame": info.tokens_per_frame, "chunks": args.chunks, "steps": args.steps,
             "threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype, "rounds": args.rounds,
             "clock": clock}
    for row in rows:
        row["setup"] = setup
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{info.tokens_per_frame} tokens/frame, {args.heads} heads x {args.head_dim}, {args.layers} layers, "
          f"FFN {args.ffn_dim}, {args.chunks} chunks, steps {args.steps}, {torch.get_num_threads()} thread(s), "
          f"{args.device} {args.dtype}, {clock} seconds")
    print("| policy | s/chunk | speedup vs full | cache MB | context tokens/head (last chunk) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['policy']} | {row['seconds_per_chunk']:.2f} | {row['speedup_vs_full']} | {row['cache_mb']:.1f} | "
              f"{row['context_tokens_per_head_last_chunk']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
