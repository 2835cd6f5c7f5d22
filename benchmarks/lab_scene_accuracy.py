"""How often drift-lab weights draw the prompt's scene: count errors on random prompts, by kind of prompt.

Draws ``--prompts`` distinct random prompts of 1 to ``--max-sprites`` sprites from the scene generator
(``numpy`` seed ``--prompt-seed``), rolls each out with ``full`` for ``--chunks`` chunks and ``--seeds``
seeds through ``cachepolicy compare`` (one folder per weights under ``--out``, resumable), and prints,
per kind of prompt (one sprite, two of one colour, two of two colours, ...): the count error at chunk 0
and over all chunks, the share of jobs whose every frame of chunk 0 has the prompt's number of sprites
of each colour ("exact"), and the colour error of the sprites found. Used for the drift-lab page::

    python benchmarks/lab_scene_accuracy.py --weights cachepolicy/lab/weights --weights OLD/final
    python benchmarks/lab_scene_accuracy.py --weights cachepolicy/lab/weights --model-option guidance=1

(about 5 minutes per weights folder on two cores with the defaults and the shipped sampler; ``--out`` keeps
one folder per weights index, so give another ``--out`` when the options change).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("lab_scene_accuracy")

METRICS = ("scene-count-error", "scene-colour-error")


def random_prompts(count: int, max_sprites: int, seed: int) -> list[str]:
    """``count`` distinct canonical prompts drawn by :func:`cachepolicy.lab.scenes.sample_spec`."""
    from cachepolicy.lab.scenes import SceneConfig, sample_spec

    rng = np.random.default_rng(seed)
    prompts: list[str] = []
    for _ in range(100 * count):
        prompt = sample_spec(rng, SceneConfig(max_sprites=max_sprites)).prompt
        if prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"could not draw {count} distinct prompts of at most {max_sprites} sprites")


def kind(prompt: str) -> str:
    """``"1 sprite"``, ``"2 sprites, 1 colour"``, ``"2 sprites, 2 colours"``, ...: sprites and colour groups."""
    from cachepolicy.lab.scenes import parse_prompt

    spec = parse_prompt(prompt)
    if spec.num_sprites == 1:
        return "1 sprite"
    colours = len(spec.groups)
    return f"{spec.num_sprites} sprites, {colours} colour{'s' if colours > 1 else ''}"


def table(records: list[dict]) -> list[tuple[str, int, float, float, float, float]]:
    """Rows ``(kind, jobs, count error chunk 0, count error all chunks, exact share, colour error)``."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for record in records:
        groups[kind(record["prompt"])].append(record)
    rows = []
    for name in [*sorted(groups), "all"]:
        chosen = records if name == "all" else groups[name]
        counts = np.array([r["curves"]["scene-count-error"] for r in chosen], dtype=float)  # [jobs, chunks]
        colours = np.array([r["curves"]["scene-colour-error"] for r in chosen], dtype=float)
        colour = float(np.nanmean(colours)) if np.isfinite(colours).any() else float("nan")
        rows.append((name, len(chosen), float(counts[:, 0].mean()), float(counts.mean()),
                     float((counts[:, 0] == 0).mean()), colour))
    return rows


def main(argv: list[str] | None = None) -> None:
    from cachepolicy.cli import parse_option
    from cachepolicy.compare import CompareConfig, run_compare

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", action="append", required=True,
                        help="a drift-lab weights folder (config.json + weights.safetensors); repeatable")
    parser.add_argument("--prompts", type=int, default=24, help="random prompts (default 24)")
    parser.add_argument("--max-sprites", type=int, default=2, help="most sprites per prompt (default 2)")
    parser.add_argument("--prompt-seed", type=int, default=1234, help="seed of the prompt draw (default 1234)")
    parser.add_argument("--seeds", type=int, default=2, help="rollout seeds per prompt (default 2)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks per rollout (default 4)")
    parser.add_argument("--out", default="runs/lab-scene-accuracy", help="compare folders go here")
    parser.add_argument("--model-option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                        help="drift-lab loader option for every weights folder, e.g. guidance=1, steps=12, "
                             "noise=predicted (repeatable; default: each folder's own sampler)")
    args = parser.parse_args(argv)
    options = dict(args.model_option)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prompts = random_prompts(args.prompts, args.max_sprites, args.prompt_seed)
    print("| weights | prompts | jobs | count error, chunk 0 | count error, all chunks | exact at chunk 0 "
          "| colour error |")
    print("|---|---|---|---|---|---|---|")
    for index, folder in enumerate(args.weights):
        config = CompareConfig(model="drift-lab", policies=["full"], prompts=prompts,
                               seeds=list(range(args.seeds)), num_chunks=args.chunks, metrics=list(METRICS),
                               model_options={**options, "path": str(Path(folder).resolve())})
        out = Path(args.out) / f"weights-{index}"
        logger.info("%s: %d jobs into %s", folder, len(config.jobs()), out)
        run_compare(config, out)
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line]
        for name, jobs, first, overall, exact, colour in table(records):
            print(f"| {folder} | {name} | {jobs} | {first:.2f} | {overall:.2f} | {exact:.0%} | {colour:.3f} |")


if __name__ == "__main__":
    main()
