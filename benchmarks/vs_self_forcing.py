"""The engine against Self Forcing's own loop at equal work: time per chunk and peak memory.

One command::

    python benchmarks/vs_self_forcing.py            # table
    python benchmarks/vs_self_forcing.py --json     # {"time_ratio": ..., "memory_ratio": ..., "runs": [...]}

Both sides run the same random ``WanTransformer3DModel`` (4 layers, 4 heads x 32, 384 tokens per frame,
fp32, one thread) with Self Forcing's sampler (4 steps, context pass at 0) and the same noise:

* **engine**: ``Session`` under the ``self-forcing`` recipe (full cache), and under a 3-frame sink with a
  6-frame window (Self Forcing's ``local_attn_size=12, sink_size=3`` counts its chunk inside the window);
* **self-forcing**: the reimplementation of Self Forcing's ``CausalInferencePipeline`` loop on the same
  diffusers model that the tests check the recipe against (``tests/adapters/original.py``): its physical K/V
  buffer of the whole video (or of the window), zero-filled up front, its index arithmetic and roll, stock
  diffusers modules for everything else. ``--cross-cache`` gives it Self Forcing's ``crossattn_cache`` too
  (the prompt's keys/values computed once), as the official code has; without it the prompt's keys/values are
  recomputed on every call, as stock diffusers does.

Time: each repetition generates the rollout on each side, interleaved in one process, single-threaded; the
per-chunk time is the median over repetitions of the process's CPU seconds per chunk (``time.process_time``:
on a shared machine other processes do not count; wall seconds are reported too) and ``time_ratio`` = engine /
self-forcing. Memory: each side runs in a fresh subprocess, warmed up by a one-chunk rollout; a thread samples
the resident set every 2 ms during the rollout, and ``memory_ratio`` is the ratio of the peaks each rollout adds
above the resident set before it. Targets (issue "engine v2"): ``time_ratio <= 0.97`` and ``memory_ratio <=
1.05``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the reference loop lives with the test oracles
    sys.path.insert(0, str(ROOT))

CONFIG = dict(latent_size=(32, 48), num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4,
              text_dim=32, freq_dim=64)
PROMPT = "benchmark"
SEED = 0
SINK, WINDOW = 3, 6  # frames


def engine_rollout(chunks: int, windowed: bool) -> tuple[float, float]:
    from cachepolicy.adapters.wan.tiny import load_tiny_wan
    from cachepolicy.api import build_policies
    from cachepolicy.engine import RolloutConfig, Session
    from cachepolicy.recipes import get_recipe

    adapter = _model("engine", lambda: load_tiny_wan(0, **CONFIG))
    policies = build_policies(f"attention-sink:frames={SINK}+sliding-window:frames={WINDOW}") if windowed else []
    config = RolloutConfig(num_chunks=chunks, prompts=(PROMPT,), seeds=(SEED,), recipe=get_recipe("self-forcing"))
    start, cpu = time.perf_counter(), time.process_time()
    Session(adapter, policies, config).run()
    return time.process_time() - cpu, time.perf_counter() - start


def reference_rollout(chunks: int, windowed: bool, cross_cache: bool) -> tuple[float, float]:
    from cachepolicy.adapters.wan.tiny import load_tiny_wan
    from cachepolicy.recipes import get_recipe
    from tests.adapters.original import OriginalRun
    from tests.adapters.test_recipes import denoise_chunk

    adapter = _model("encoder", lambda: load_tiny_wan(0, **CONFIG))
    model = _model("reference", lambda: load_tiny_wan(0, **CONFIG).detach())
    info = adapter.info
    sampler = get_recipe("self-forcing").sampler
    shape = (info.latent_channels, info.frames_per_chunk, info.latent_height, info.latent_width)
    cache = dict(window_frames=SINK + WINDOW + 3, sink_frames=SINK) if windowed else {}
    start, cpu = time.perf_counter(), time.process_time()
    run = OriginalRun(model, "self-forcing", 1, tokens_per_frame=info.tokens_per_frame,
                      total_frames=chunks * info.frames_per_chunk, latent_hw=(info.latent_height, info.latent_width),
                      cross_cache=cross_cache, **cache)
    cond = adapter.encode_prompts([PROMPT])
    for chunk in range(chunks):
        denoise_chunk(run, chunk, chunk * info.frames_per_chunk, cond, (SEED,), sampler.timesteps(),
                      sampler.sigmas(), shape)
    return time.process_time() - cpu, time.perf_counter() - start


_models: dict = {}


def _model(name: str, load):
    """One model per name and process (loading is not part of what is timed)."""
    if name not in _models:
        _models[name] = load()
    return _models[name]


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rollout_peak(side: str, chunks: int, windowed: bool, cross_cache: bool) -> int:
    """Peak resident bytes one rollout adds above the resident set before it (sampled every 2 ms)."""
    warm(side)
    before = resident_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        engine_rollout(chunks, windowed) if side == "engine" else reference_rollout(chunks, windowed, cross_cache)
    finally:
        done.set()
        sampler.join()
    return max(peak[0], resident_bytes()) - before


def peak_memory(side: str, chunks: int, windowed: bool, cross_cache: bool) -> int:
    """:func:`rollout_peak` in a fresh single-threaded process."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            "import torch; torch.set_num_threads(1)\n"
            "import vs_self_forcing as b\n"
            f"print(b.rollout_peak({side!r}, {chunks}, {windowed}, {cross_cache}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.strip().splitlines()[-1])


def warm(side: str) -> None:
    """Load the models and run one chunk so that one-off allocations are not counted as the rollout's."""
    if side == "engine":
        engine_rollout(1, False)
    else:
        reference_rollout(1, False, False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[7, 14])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cross-cache", action="store_true",
                        help="give the reference Self Forcing's crossattn_cache (the prompt's K/V computed once)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warm("engine")
    warm("reference")
    runs = []
    for windowed in (False, True):
        for chunks in args.chunks:
            cpu: dict[str, list[float]] = {"engine": [], "self-forcing": []}
            wall: dict[str, list[float]] = {"engine": [], "self-forcing": []}
            for _ in range(args.repeats):
                for side, measured in (("engine", engine_rollout(chunks, windowed)),
                                       ("self-forcing", reference_rollout(chunks, windowed, args.cross_cache))):
                    cpu[side].append(measured[0] / chunks)
                    wall[side].append(measured[1] / chunks)
            engine, reference = (statistics.median(cpu[k]) for k in ("engine", "self-forcing"))
            memory = {side: peak_memory(side, chunks, windowed, args.cross_cache)
                      for side in ("engine", "reference")}
            runs.append({"cache": f"sink {SINK} + window {WINDOW}" if windowed else "full", "chunks": chunks,
                         "engine_s_per_chunk": engine, "self_forcing_s_per_chunk": reference,
                         "time_ratio": engine / reference,
                         "wall_time_ratio": statistics.median(wall["engine"]) / statistics.median(wall["self-forcing"]),
                         "engine_peak_mb": memory["engine"] / 2**20,
                         "self_forcing_peak_mb": memory["reference"] / 2**20,
                         "memory_ratio": memory["engine"] / max(memory["reference"], 1)})
    summary = {
        "time_ratio": max(r["time_ratio"] for r in runs if r["cache"] == "full"),
        "memory_ratio": max(r["memory_ratio"] for r in runs if r["cache"] == "full"),
        "reference_cross_attention_cache": args.cross_cache,
        "runs": runs,
        "targets": {"time_ratio": 0.97, "memory_ratio": 1.05},
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"reference cross-attention cache: {'yes (as Self Forcing)' if args.cross_cache else 'no (stock diffusers)'}")
    print("| cache | chunks | engine CPU s/chunk | self-forcing CPU s/chunk | time ratio (wall) | engine peak MB | "
          "self-forcing peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['cache']} | {r['chunks']} | {r['engine_s_per_chunk']:.3f} | {r['self_forcing_s_per_chunk']:.3f} | "
              f"{r['time_ratio']:.3f} ({r['wall_time_ratio']:.3f}) | {r['engine_peak_mb']:.1f} | "
              f"{r['self_forcing_peak_mb']:.1f} | {r['memory_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
