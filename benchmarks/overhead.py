"""Engine + policy overhead per chunk, and memory against rollout length under a sliding window.

One command::

    python benchmarks/overhead.py            # table
    python benchmarks/overhead.py --json     # {"overhead_fraction": ..., "memory_growth": ..., ...}

Model: a random WanTransformer3DModel (``tiny-wan`` loader with a bigger config) at 1152 tokens per chunk
(latent 32x48, patch 2x2: 384 tokens per frame, 3 frames per chunk). Each chunk's wall time is split into
the model forwards (5 per chunk: 4 denoising steps + the context pass; this includes the cached attention
itself) and everything else the engine and the policies do (noise, hooks, selection, compaction, trace).

Targets (issues "core engine" and "engine v2"): overhead <= 1% of chunk time; memory flat under a window:
the mean of the last 10% of chunks within 5% of the mean of the first 10% after warm-up (the window is full).
Memory is the process's resident set on CPU, ``torch.cuda.memory_allocated`` on CUDA, plus the cache's
own K/V buffer size. The committed latents (the video itself, kept on the CPU; 0.07 MB per chunk here) grow with
the rollout by design, so the target is on the resident set minus them (``memory_growth``); the raw resident
set's growth is reported too (``memory_growth_raw``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys

import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.policy import build_policies
from cachepolicy.registry import discover


def resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--policy", default="attention-sink:frames=3+sliding-window:frames=6")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    adapter = load_tiny_wan(0, device=args.device, dtype=args.dtype, latent_size=(32, 48),
                            num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4,
                            text_dim=32, freq_dim=64)
    policies = build_policies(args.policy, discover().policies)
    device = torch.device(args.device)
    memory: list[int] = []
    video: list[int] = []
    cache_bytes: list[int] = []

    def on_chunk(record: dict) -> None:
        memory.append(resident_bytes(device))
        video.append(sum(latent.numel() * latent.element_size() for latent in session.latents))
        cache_bytes.append(record["cache_bytes"])

    config = RolloutConfig(num_chunks=args.chunks, prompts=("benchmark",), seeds=(0,),
                           synchronize_timing=device.type == "cuda")
    session = Session(adapter, policies, config, on_chunk=on_chunk, progress=sys.stderr.isatty())
    result = session.run()

    trace = result.trace[2:]  # first chunks pay one-off allocation and warm-up costs
    chunk_seconds = sum(r["seconds"] for r in trace)
    forward_seconds = sum(r["forward_seconds"] for r in trace)
    overhead_fraction = (chunk_seconds - forward_seconds) / chunk_seconds
    tenth = max(1, args.chunks // 10)
    warm = next((i for i, r in enumerate(result.trace) if r["dropped_tokens"] and any(r["dropped_tokens"].values())),
                0)
    engine = [total - latents for total, latents in zip(memory, video)]
    first, last = engine[warm:warm + tenth], engine[-tenth:]
    memory_growth = statistics.mean(last) / statistics.mean(first) - 1.0
    memory_growth_raw = statistics.mean(memory[-tenth:]) / statistics.mean(memory[warm:warm + tenth]) - 1.0
    cache_growth = statistics.mean(cache_bytes[-tenth:]) / statistics.mean(cache_bytes[warm:warm + tenth]) - 1.0
    summary = {
        "policy": args.policy,
        "chunks": args.chunks,
        "tokens_per_chunk": adapter.info.tokens_per_chunk,
        "resident_tokens_after_warmup": result.trace[-1]["cache_tokens"],
        "chunk_ms": 1000 * chunk_seconds / len(trace),
        "forward_ms": 1000 * forward_seconds / len(trace),
        "overhead_ms": 1000 * (chunk_seconds - forward_seconds) / len(trace),
        "overhead_fraction": overhead_fraction,
        "memory_first_mb": statistics.mean(first) / 2**20,
        "memory_last_mb": statistics.mean(last) / 2**20,
        "memory_growth": memory_growth,
        "memory_growth_raw": memory_growth_raw,
        "video_mb_last": video[-1] / 2**20,
        "cache_mb_last": cache_bytes[-1] / 2**20,
        "cache_growth": cache_growth,
        "cache_reallocations": session.cache.reallocations,
        "warmup_chunks": warm,
        "device": str(device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "targets": {"overhead_fraction": 0.01, "memory_growth": 0.05},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = [
        ("policy", summary["policy"]),
        ("chunks x tokens/chunk", f"{args.chunks} x {summary['tokens_per_chunk']}"),
        ("resident context tokens", str(summary["resident_tokens_after_warmup"])),
        ("chunk time (ms)", f"{summary['chunk_ms']:.2f}"),
        ("model forwards (ms)", f"{summary['forward_ms']:.2f}"),
        ("engine + policy overhead (ms)", f"{summary['overhead_ms']:.3f}"),
        ("overhead fraction (target <= 1%)", f"{100 * overhead_fraction:.2f}%"),
        ("memory first 10% after warm-up (MB, without the video)", f"{summary['memory_first_mb']:.1f}"),
        ("memory last 10% (MB, without the video)", f"{summary['memory_last_mb']:.1f}"),
        ("memory growth (target <= 5%)", f"{100 * memory_growth:+.2f}%"),
        ("video latents at the end (MB); raw growth", f"{summary['video_mb_last']:.1f}; "
                                                      f"{100 * memory_growth_raw:+.2f}%"),
        ("cache K/V buffer (MB), growth", f"{summary['cache_mb_last']:.2f}, {100 * cache_growth:+.2f}%"),
        ("cache reallocations", str(summary["cache_reallocations"])),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'metric'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
