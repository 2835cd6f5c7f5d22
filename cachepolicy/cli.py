"""The ``cachepolicy`` command line.

Imports are lazy: ``cachepolicy --help`` and ``cachepolicy plugins`` never import torch or diffusers.
Exit status: 0 success; 2 refused (bad input, a damaged folder, a folder another process is writing: one
line on stderr naming the value and what is allowed, nothing written); 3 the model or a policy failed mid-run,
or some compare jobs failed (what finished is kept); 128 + N stopped by signal N (``SIGINT``, ``SIGTERM``,
``SIGHUP``: what finished is kept); 1 anything unexpected.

Without a terminal on stderr, ``run`` and ``compare`` log one line per finished chunk or job instead of a
progress bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

logger = logging.getLogger("cachepolicy")

EXIT_BAD_INPUT = 2
EXIT_MODEL_FAILED = 3
#: the signals that ask a run to stop: each saves what finished, then exits with 128 + the signal's number
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def parse_option(text: str) -> tuple[str, Any]:
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


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
                         description="Generate --chunks chunks with MODEL under the given policies and write "
                                     "latents.safetensors, run.json and trace.jsonl to --out.")
    run.add_argument("model", help="model name (see 'cachepolicy plugins') or a diffusers Wan folder")
    run.add_argument("--policy", "-p", action="append", default=[], metavar="SPEC",
                     help="policy spec, e.g. 'attention-sink:frames=3+sliding-window:frames=12'; repeat to "
                          "compose (same as '+'); default: full")
    run.add_argument("--chunks", type=_positive, required=True, help="chunks to generate")
    run.add_argument("--seed", type=_non_negative, default=0, help="seed of the first sample (default 0)")
    run.add_argument("--batch", type=_positive, default=1, help="samples, seeded seed, seed+1, ... (default 1)")
    run.add_argument("--prompt", action="append", default=[],
                     help="prompt (repeat for one per sample; default: the model's default prompt)")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--columns", type=_positive, default=None,
                     help="samples per row of video.mp4/video.gif (default: all in one row)")
    run.add_argument("--device", default=None, help="torch device of the model (default: the loader's, cpu)")
    run.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    run.add_argument("--model-option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                     help="option passed to the model loader (e.g. seed=1, path=DIR)")
    run.add_argument("--recipe", default=None, metavar="NAME",
                     help="a system's inference loop: self-forcing, causvid, longlive, rolling-forcing (see "
                          "'cachepolicy recipes'); "
                          "its policies compose with --policy")
    run.add_argument("--switch", action="append", default=[], type=_parse_switch, metavar="CHUNK:PROMPT",
                     help="from chunk CHUNK on, follow PROMPT (repeat for several switches; LongLive's recipe "
                          "re-caches the recent frames under the new prompt; a PROMPT starting with '#' marks a "
                          "scene cut, e.g. 9:'#a beach at night')")
    run.add_argument("--noise", default="seeded", choices=["seeded", "official"],
                     help="seeded: one generator per (sample seed, chunk, use), the default; official: the recipe's "
                          "official script's draws from one generator seeded with --seed (needs --recipe)")
    run.add_argument("--trace-residency", action="store_true",
                     help="record the resident tokens after every chunk in trace.jsonl (field 'residency')")
    run.add_argument("--force", action="store_true",
                     help="replace a run already in --out (the new run is built beside it and swapped in whole)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar (without a terminal: no line per chunk)")
    recipes = sub.add_parser("recipes", help="list the built-in inference recipes and their defaults",
                             description="List the recipes that --recipe accepts, with their sampler, policies, "
                                         "re-cache and restart settings and where they were read.")
    recipes.add_argument("--json", action="store_true", help="print a JSON list of objects")
    compare = sub.add_parser(
        "compare", help="a grid of policies x prompts x seeds on one or more models, resumable, with a report",
        description="Run every (model, policy, prompt, seed) job, appending one line per finished job to "
                    "DIR/results.jsonl (a rerun with the same settings resumes), then write summary.json, "
                    "summary.md and report.html (plots, side-by-side videos) into DIR.")
    compare.add_argument("models", nargs="+", metavar="MODEL",
                         help="model name (see 'cachepolicy plugins') or a diffusers Wan folder; several run "
                              "the same grid on each, one after the other")
    compare.add_argument("--policies", required=True, action="append", metavar="'SPEC; SPEC; ...'",
                         help="composed policy specs separated by ';' (repeatable)")
    compare.add_argument("--prompts", required=True, metavar="FILE_OR_TEXT",
                         help="a prompts file (one per line) or prompts separated by ';'")
    compare.add_argument("--seeds", default="0", help="seeds: '0-7', '0,3,5' (default 0)")
    compare.add_argument("--chunks", type=_positive, required=True, help="chunks per job")
    compare.add_argument("--recipe", default=None, metavar="NAME",
                         help="run every job under a system's inference loop (see 'cachepolicy recipes'); its "
                              "policies compose with each policy spec")
    compare.add_argument("--baseline", default=None, metavar="SPEC",
                         help="the policy every other one is paired with in the report: per prompt and seed, "
                              "the difference from it (default: the first listed)")
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument("--metrics", default=None,
                         help="comma-separated metric names (default: every available metric)")
    compare.add_argument("--metric-option", action="append", default=[], type=parse_option,
                         metavar="METRIC.KEY=VALUE", help="option for a metric, e.g. feature-consistency.path=DIR")
    compare.add_argument("--model-option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                         help="option passed to the loader of every model")
    compare.add_argument("--device", default=None, help="torch device of the model")
    compare.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    compare.add_argument("--executor", default="local", choices=["local", "ray"],
                         help="where jobs run (ray: pip install 'cachepolicy[ray]')")
    compare.add_argument("--ray-address", default=None, help="Ray cluster address (default: local instance)")
    compare.add_argument("--gpus-per-job", type=float, default=0.0, help="GPUs each Ray task asks for")
    compare.add_argument("--force", action="store_true",
                         help="DIR holds another configuration: archive it and start over")
    compare.add_argument("--no-progress", action="store_true",
                         help="no progress bars (without a terminal: no line per job)")

    calibrate = sub.add_parser(
        "calibrate", help="measure every attention head of a model and write Forcing-KV head roles (JSON)",
        description="Generate --chunks chunks of one prompt with every frame kept, measure where each head's "
                    "attention goes in the last chunk's denoising steps and write static / dynamic head roles in "
                    "the Forcing-KV reference's JSON format (static iff the mass on the chunk and the anchor frame "
                    "over the mass past the sink is at least --threshold). Use with --policy "
                    "'forcing-kv:roles=ROLES.json'.")
    calibrate.add_argument("model", help="model name (see 'cachepolicy plugins') or a diffusers Wan folder")
    calibrate.add_argument("--out", required=True, metavar="ROLES.json", help="the role file to write")
    calibrate.add_argument("--prompt", action="append", default=[],
                           help="prompt (repeat for several samples; default: the documented calibration prompt)")
    calibrate.add_argument("--seed", type=_non_negative, default=0, help="seed of the first sample (default 0)")
    calibrate.add_argument("--chunks", type=_positive, default=7,
                           help="chunks generated; the last one is measured (default 7: frames 18..20)")
    calibrate.add_argument("--steps", default=None, metavar="I,J,...",
                           help="denoising-step indices of the measured chunk (default: every step)")
    calibrate.add_argument("--sink-frames", type=_non_negative, default=3,
                           help="sink frames left out of the denominator (default 3, as the shipped files)")
    calibrate.add_argument("--threshold", type=float, default=0.8, help="static iff the ratio >= this (default 0.8)")
    calibrate.add_argument("--model-option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                           help="option passed to the model loader (e.g. seed=1, path=DIR)")
    calibrate.add_argument("--device", default=None, help="torch device of the model (default: the loader's, cpu)")
    calibrate.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    calibrate.add_argument("--force", action="store_true", help="replace an existing --out file")

    report = sub.add_parser("report", help="rewrite the report of a compare folder from its results",
                            description="Regenerate summary.json, summary.md and report.html from "
                                        "DIR/config.json and DIR/results.jsonl.")
    report.add_argument("dir", help="a compare output folder")
    report.add_argument("--baseline", default=None, metavar="SPEC",
                        help="pair every policy with this one (default: the baseline of the compare command, "
                             "else the first listed); DIR/config.json is left as it is")
    return parser


def _parse_switch(text: str) -> Any:
    from cachepolicy.engine import PromptSwitch

    chunk, colon, prompt = text.partition(":")
    try:
        index = int(chunk)
    except ValueError:
        index = None
    if not colon or index is None or not prompt.strip():
        raise argparse.ArgumentTypeError(f"--switch {text!r}: write CHUNK:PROMPT, e.g. 4:'a cat turns around'")
    return PromptSwitch(index, prompt.strip())


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """Loader options from ``--model-option KEY=VALUE``, ``--device`` and ``--dtype``."""
    options = dict(args.model_option)
    if args.device:
        options["device"] = args.device
    if args.dtype:
        options["dtype"] = args.dtype
    return options


def _cmd_compare(args: argparse.Namespace) -> int:
    from cachepolicy.compare import CompareConfig, default_metrics, parse_seeds, read_prompts, run_compare, split_policies
    from cachepolicy.errors import CompareConfigError
    from cachepolicy.executors import make_executor

    metric_options: dict[str, dict[str, Any]] = {}
    for key, value in args.metric_option:
        metric, dot, option = key.partition(".")
        if not dot or not option:
            raise CompareConfigError(f"--metric-option {key}={value}: write METRIC.KEY=VALUE")
        metric_options.setdefault(metric, {})[option] = value
    metrics = (tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics
               else default_metrics(metric_options, args.models))
    model_options = _model_options(args)
    config = CompareConfig(models=args.models, policies=split_policies(args.policies),
                           prompts=read_prompts(args.prompts), seeds=parse_seeds(args.seeds),
                           num_chunks=args.chunks, metrics=metrics, model_options=model_options,
                           metric_options=metric_options, recipe=args.recipe, baseline=args.baseline)
    executor_options = {}
    if args.executor == "ray":
        executor_options = {"address": args.ray_address, "gpus_per_job": args.gpus_per_job}
    executor = make_executor(args.executor, **executor_options)
    summary = run_compare(config, args.out, executor=executor, force=args.force,
                          progress=not args.no_progress and sys.stderr.isatty())
    from pathlib import Path

    print((Path(args.out) / "summary.md").read_text())
    print(f"report: {Path(args.out) / 'report.html'}")
    if summary["jobs_failed"]:
        print(f"error: {summary['jobs_failed']} of {summary['jobs_total']} jobs failed (listed in "
              f"{Path(args.out) / 'summary.md'}); rerun the same command to try them again", file=sys.stderr)
        return EXIT_MODEL_FAILED
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cachepolicy.compare.folder import read_folder
    from cachepolicy.folders import FolderLock
    from cachepolicy.report import write_report

    folder = Path(args.dir)
    config, records = read_folder(folder)
    if args.baseline is not None:
        import attrs

        from cachepolicy.compare.checks import baseline_policy

        config = attrs.evolve(config, baseline=args.baseline)
        baseline_policy(config)  # before anything is written
    with FolderLock(folder, "cachepolicy report"):
        write_report(folder, config, records)
    print(f"report: {folder / 'report.html'}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from cachepolicy.calibrate import calibrate
    from cachepolicy.errors import ParameterError

    steps = None
    if args.steps is not None:
        try:
            steps = [int(part) for part in args.steps.split(",")]
        except ValueError:
            raise ParameterError(f"--steps {args.steps!r}: write step indices separated by commas, e.g. 0,1,2,3") \
                from None
    payload = calibrate(args.model, out=args.out, prompts=args.prompt or None, seed=args.seed, chunks=args.chunks,
                        steps=steps, sink_frames=args.sink_frames, threshold=args.threshold,
                        model_options=_model_options(args), force=args.force)
    found = payload["calibration"]
    print(f"wrote {args.out}: {found['static']} static / {found['dynamic']} dynamic heads "
          f"({payload['num_layers']} layers x {payload['num_heads']} heads)")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from cachepolicy.registry import get_registry

    kinds = ("policy", "model", "metric", "plugin")
    records = sorted(get_registry().records,
                     key=lambda r: (kinds.index(r.kind) if r.kind in kinds else len(kinds), r.name))
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


def _cmd_recipes(args: argparse.Namespace) -> int:
    from cachepolicy.recipes import RECIPES

    if args.json:
        print(json.dumps([recipe.to_json() for recipe in RECIPES.values()], indent=2))
        return 0
    for recipe in RECIPES.values():
        print(f"{recipe.name}: {recipe.summary}")
        if recipe.sampler is not None:
            sampler = recipe.sampler
            sigmas = sampler.sigmas() if recipe.stagger is None else recipe.stagger.sigmas()[:-1]
            print(f"    timesteps {', '.join(f'{t:g}' for t in sampler.timesteps())}; sigmas "
                  f"{', '.join(f'{s:.4f}' for s in sigmas)}; context noise {sampler.context_noise:g}"
                  + (f"; guidance {sampler.guidance:g}" if sampler.guided else ""))
        if recipe.stagger is not None:
            stagger = recipe.stagger
            print(f"    UniPC (order 2, corrector) per block, {stagger.steps} steps, shift {stagger.shift:g}; blocks "
                  f"denoised jointly, block-causally, each {stagger.ar_step} steps behind the one before (ar_step)")
        if recipe.policies:
            print(f"    policies {'+'.join(recipe.policies)}")
        if recipe.recache is not None:
            print(f"    re-cache at prompt switches: window {recipe.recache.window_frames} frames, "
                  f"sink {recipe.recache.sink_frames}")
        if recipe.restart is not None:
            print(f"    restarts: rollouts of {recipe.restart.rollout_frames} frames, overlap "
                  f"{recipe.restart.overlap_frames}")
        if recipe.rolling is not None:
            print(f"    rolling window of {len(recipe.sampler.denoising_steps) if recipe.sampler else '?'} chunks "
                  f"at staggered noise levels; anchor {recipe.rolling.anchor_frames} frames re-rotated on read; "
                  f"at most {recipe.rolling.max_attention_frames} frames attended; keys stored {recipe.rope_mode}")
        print(f"    source {recipe.source}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from cachepolicy.api import run_to_dir
    from cachepolicy.errors import CachePolicyError
    from cachepolicy.recipes import get_recipe

    recipe = get_recipe(args.recipe) if args.recipe else None
    if args.noise == "official" and (recipe is None or recipe.noise_order is None):
        raise CachePolicyError("--noise official draws in the order of a system's official script: give its "
                               "--recipe (self-forcing, longlive, rolling-forcing or causvid)")
    policies = args.policy or ([] if recipe is not None and recipe.policies else ["full"])
    paths = run_to_dir(args.model, policies, out=args.out, num_chunks=args.chunks, seed=args.seed,
                       batch=args.batch, prompts=args.prompt or None, model_options=_model_options(args),
                       force=args.force, progress=not args.no_progress and sys.stderr.isatty(),
                       recipe=recipe, prompt_switches=args.switch, video_columns=args.columns,
                       trace_residency=args.trace_residency,
                       noise=recipe.official_noise(args.seed) if args.noise == "official" else None)
    logger.info("run finished")
    print(f"wrote {paths['latents']}")
    print(f"wrote {paths['trace']}")
    print(f"wrote {paths['run']}")
    for video in paths.get("videos", []):
        print(f"wrote {video}")
    return 0


def _install_stop_handlers() -> dict[int, Any]:
    """Make each stop signal raise :class:`~cachepolicy.errors.StopRequested` once (later ones are ignored
    while what finished is saved); returns the handlers to restore."""
    from cachepolicy.folders import request_stop

    stopping = []

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stopping:
            logger.warning("%s received while stopping: still saving what finished (SIGKILL stops at once)", name)
            return
        stopping.append(name)
        request_stop(name)

    import threading

    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return previous
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handler)
    return previous


def _stopped_message(args: argparse.Namespace, name: str) -> str:
    """What a stopped command kept, in one line."""
    from pathlib import Path

    if args.command == "run":
        try:
            run = json.loads((Path(args.out) / "run.json").read_text())
        except (OSError, ValueError):
            run = {}
        if run.get("status") == "interrupted":
            return (f"stopped by {name}: the {run.get('chunks_completed', 0)} chunks finished are in {args.out} "
                    f"(run.json: status 'interrupted')")
        return f"stopped by {name} before the run started writing {args.out}"
    if args.command == "compare":
        return (f"stopped by {name}: the jobs finished so far are in {Path(args.out) / 'results.jsonl'}; rerun the "
                f"same command to resume")
    return f"stopped by {name}"


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(exc)).strip()


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
    from cachepolicy.errors import CachePolicyError, NonFiniteOutputError, PolicyHookError

    progress = logging.getLogger("cachepolicy.progress")
    if not getattr(args, "no_progress", True) and not sys.stderr.isatty():
        progress.setLevel(logging.INFO)  # one line per chunk or job instead of a bar
    previous = _install_stop_handlers()
    try:
        commands = {"plugins": _cmd_plugins, "run": _cmd_run, "recipes": _cmd_recipes, "compare": _cmd_compare,
                    "report": _cmd_report, "calibrate": _cmd_calibrate}
        return commands[args.command](args)
    except BrokenPipeError:  # e.g. 'cachepolicy plugins --json | head'
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as exc:  # StopRequested too
        name = getattr(exc, "signal_name", "SIGINT")
        print(_stopped_message(args, name), file=sys.stderr)
        return 128 + int(getattr(signal, name, signal.SIGINT))
    except (NonFiniteOutputError, PolicyHookError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_MODEL_FAILED
    except CachePolicyError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a full disk, a file that cannot be written: the system's words, one line
        logger.debug("operating system error", exc_info=True)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        progress.setLevel(logging.NOTSET)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
