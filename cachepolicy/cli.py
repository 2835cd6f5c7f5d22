"""The ``cachepolicy`` command line.

Imports are lazy: ``cachepolicy --help`` and ``cachepolicy plugins`` never import torch or diffusers.
Exit status: 0 success, 2 bad input (a clear message on stderr), 3 the model failed mid-run (outputs
kept), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("cachepolicy")

EXIT_BAD_INPUT = 2
EXIT_MODEL_FAILED = 3


def _parse_option(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachepolicy",
        description="Inference-time KV-cache policies for autoregressive video generation.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    plugins = sub.add_parser("plugins", help="list installed policies, models and plugins that failed to load",
                             description="List what the cachepolicy entry-point group provides.")
    plugins.add_argument("--json", action="store_true", help="print a JSON list of objects")

    run = sub.add_parser("run", help="one rollout of one model with a composition of policies",
                         description="Generate NUM chunks with MODEL under the given policies and write "
                                     "latents.safetensors, run.json and trace.jsonl to --out.")
    run.add_argument("model", help="model name (see 'cachepolicy plugins') or a diffusers Wan folder")
    run.add_argument("--policy", "-p", action="append", default=[], metavar="SPEC",
                     help="policy spec, e.g. 'attention-sink:frames=3+sliding-window:frames=12'; repeat to "
                          "compose (same as '+'); default: full")
    run.add_argument("--chunks", type=_positive, required=True, help="chunks to generate")
    run.add_argument("--seed", type=_non_negative, default=0, help="seed of the first sample (default 0)")
    run.add_argument("--batch", type=_positive, default=1, help="samples, seeded seed, seed+1, ... (default 1)")
    run.add_argument("--prompt", action="append", default=[], help="prompt (repeat for one per sample)")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--device", default=None, help="torch device of the model (default: the loader's, cpu)")
    run.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    run.add_argument("--model-option", action="append", default=[], type=_parse_option, metavar="KEY=VALUE",
                     help="option passed to the model loader (e.g. seed=1, path=DIR)")
    run.add_argument("--force", action="store_true", help="replace a run already in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _cmd_plugins(args: argparse.Namespace) -> int:
    from cachepolicy.registry import get_registry

    records = get_registry().records
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    header = ("NAME", "KIND", "DISTRIBUTION", "VERSION", "HOOKS / STATUS")
    rows = []
    for r in records:
        status = f"ERROR: {r.error}" if r.error else (", ".join(h.removeprefix("cachepolicy_") for h in r.hooks)
                                                     or r.summary)
        rows.append((r.name, r.kind, r.distribution or "-", r.version or "-", status))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from cachepolicy.api import run_to_dir

    options = dict(args.model_option)
    if args.device:
        options["device"] = args.device
    if args.dtype:
        options["dtype"] = args.dtype
    paths = run_to_dir(args.model, args.policy or ["full"], out=args.out, num_chunks=args.chunks, seed=args.seed,
                       batch=args.batch, prompts=args.prompt or None, model_options=options, force=args.force,
                       progress=not args.no_progress and sys.stderr.isatty())
    logger.info("run finished")
    print(f"wrote {paths['latents']}")
    print(f"wrote {paths['trace']}")
    print(f"wrote {paths['run']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.version:
        from cachepolicy import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from cachepolicy.errors import CachePolicyError, NonFiniteOutputError

    try:
        if args.command == "plugins":
            return _cmd_plugins(args)
        return _cmd_run(args)
    except NonFiniteOutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MODEL_FAILED
    except CachePolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
