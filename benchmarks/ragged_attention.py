"""Ragged per-head attention pays for what it holds: one layer's cached attention when half of the heads hold
1 context frame and half hold 6, against every head holding 6 (each also attends the chunk's own 3 frames).

One command::

    python benchmarks/ragged_attention.py            # table
    python benchmarks/ragged_attention.py --json     # {"ratio": ..., "ideal": ..., ...}

Both caches are real :class:`~cachepolicy.cache.KVCache` objects built through the per-layer entry point
(:meth:`KVCache.attend`, the Wan adapter's rotary embedding and attention kernel); the ragged one was split
by a per-head keep set, so it runs one attention call per head group over only the tokens the group holds.
Each repetition times one ``attend`` of a 3-frame chunk (its random inputs made beforehand: the time is the
layer's cached attention path, rotation and writes included) on each cache, interleaved, in one single-threaded
process, in CPU seconds (``time.process_time``: other processes on a shared machine do not count); the ratio
is of the medians. ``ideal`` is the ratio of keys attended: half the heads read ``1 + 3`` frames and
half ``6 + 3``, against ``6 + 3`` for all: ``(4 + 9) / 18 = 0.72``. Target: ``ratio <= 1.15 * ideal``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from cachepolicy.adapters.wan.adapter import CachedWanAttnProcessor, ForwardState
from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.cache import KVCache, metadata_for_chunk
from cachepolicy.layers import ForwardCall

FRAMES = 3


def build(adapter, heads: int, head_dim: int, rows: int, cols: int, ragged: bool) -> KVCache:
    """A one-layer cache holding 6 context frames in every head, or (``ragged``) only the newest frame in the
    even heads."""
    cache = KVCache(1, 1, heads, head_dim, cols)
    cache.rotary = adapter.rope
    attention = CachedWanAttnProcessor(0, ForwardState()).attention
    generator = torch.Generator().manual_seed(0)
    for chunk in range(2):
        run(adapter, cache, chunk, rows, cols, attention, generator)
        cache.commit(metadata_for_chunk(1, chunk * FRAMES, FRAMES, rows, cols, chunk))
    if ragged:
        view = cache.view()
        keep = view.valid.expand(1, heads, *view.valid.shape).clone()
        keep[0, 0::2] &= view.frame == 2 * FRAMES - 1
        cache.compact(keep)
    return cache


def inputs(adapter, cache: KVCache, chunk: int, rows: int, cols: int, generator) -> dict:
    """A chunk's call (queries, keys, values before RoPE, its RoPE tables and positions), made once."""
    n = FRAMES * rows * cols
    own = metadata_for_chunk(1, chunk * FRAMES, FRAMES, rows, cols, 0)
    return {
        "call": ForwardCall(chunk=chunk, phase="step", frame_start=chunk * FRAMES, num_frames=FRAMES,
                            rope_start=chunk * FRAMES),
        "tables": adapter.rope.tables(own["rope_pos"], own["row"], own["col"]),
        "own": own,
        "qkv": [torch.randn(1, n, cache.num_heads, cache.head_dim, generator=generator) for _ in range(3)],
    }


def run(adapter, cache: KVCache, chunk: int, rows: int, cols: int, attention, generator) -> torch.Tensor:
    """One layer call of chunk ``chunk`` on random queries, keys and values."""
    return attend(adapter, cache, inputs(adapter, cache, chunk, rows, cols, generator), attention)


def attend(adapter, cache: KVCache, call: dict, attention) -> torch.Tensor:
    with cache.forward(call["call"], rotary=adapter.rope, own_tables=call["tables"], own_positions=call["own"]):
        return cache.attend(0, *call["qkv"], attention=attention)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens-side", type=int, default=16, help="token rows = columns (default 16: 256 per frame)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    side = args.tokens_side
    adapter = load_tiny_wan(0, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                            latent_size=(2 * side, 2 * side))
    caches = {"ragged": build(adapter, args.heads, args.head_dim, side, side, True),
              "uniform": build(adapter, args.heads, args.head_dim, side, side, False)}
    attention = CachedWanAttnProcessor(0, ForwardState()).attention
    generator = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name in caches}
    calls = {name: inputs(adapter, cache, 2, side, side, generator) for name, cache in caches.items()}
    for repeat in range(args.repeats + 2):
        for name, cache in caches.items():
            start = time.process_time()
            attend(adapter, cache, calls[name], attention)
            if repeat >= 2:  # warm-up
                times[name].append(time.process_time() - start)
    ragged, uniform = (statistics.median(times[name]) for name in ("ragged", "uniform"))
    tpf = side * side
    short, long_ = args.heads // 2, args.heads - args.heads // 2  # heads at 1 and at 6 context frames
    ideal = (short * (1 + FRAMES) + long_ * (6 + FRAMES)) / (args.heads * (6 + FRAMES))
    summary = {
        "ratio": ragged / uniform,
        "ideal": ideal,
        "target": 1.15 * ideal,
        "ragged_ms": 1000 * ragged,
        "uniform_ms": 1000 * uniform,
        "head_groups": [list(cell.heads) for cell in caches["ragged"].layer_cells(0)],
        "keys_per_group": [cell.residency.max_length + FRAMES * tpf for cell in caches["ragged"].layer_cells(0)],
        "heads": args.heads, "head_dim": args.head_dim, "tokens_per_frame": tpf, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = [
        ("config", f"{args.heads} heads x {args.head_dim}, {tpf} tokens/frame, chunk of {FRAMES} frames"),
        ("uniform: every head 6 context frames (ms)", f"{summary['uniform_ms']:.2f}"),
        ("ragged: half 1, half 6 context frames (ms)", f"{summary['ragged_ms']:.2f}"),
        ("ratio ragged / uniform", f"{summary['ratio']:.3f}"),
        ("ideal (keys attended)", f"{ideal:.3f}"),
        ("target (1.15 x ideal)", f"{summary['target']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'metric'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
