"""``cachepolicy compare``: a grid of models x policies x prompts x seeds, resumable, with a report.

Layout of the output folder::

    DIR/config.json        the configuration and its fingerprint (a rerun must match it)
    DIR/results.jsonl      one line per finished job: model, policy (spec as given), prompt, seed, metrics, curves
    DIR/jobs/<id>/         latents.safetensors, trace.jsonl, preview.npy (uint8 frames for the videos)
    DIR/summary.json, summary.md, report.html, plots/, videos/   (see :mod:`cachepolicy.report`)

The parts, each usable alone: :mod:`~cachepolicy.compare.parsing` (the grid's text inputs),
:mod:`~cachepolicy.compare.config` (jobs, configuration, fingerprint), :mod:`~cachepolicy.compare.checks`
(everything checked before a job runs), :mod:`~cachepolicy.compare.store` (``results.jsonl``),
:mod:`~cachepolicy.compare.folder` (the output folder: resume, archive), :mod:`~cachepolicy.compare.worker`
(one job) and :mod:`~cachepolicy.compare.driver` (the whole comparison).
"""

from __future__ import annotations

from cachepolicy.compare.checks import check_model, default_metrics, validate
from cachepolicy.compare.config import CompareConfig, Job
from cachepolicy.compare.driver import run_compare
from cachepolicy.compare.folder import CONFIG_FILE, RESULTS_FILE, prepare_folder
from cachepolicy.compare.parsing import parse_seeds, read_prompts, split_policies
from cachepolicy.compare.store import ResultsStore
from cachepolicy.compare.worker import preview_frames, run_job

__all__ = ["CONFIG_FILE", "RESULTS_FILE", "CompareConfig", "Job", "ResultsStore", "check_model", "default_metrics",
           "parse_seeds", "prepare_folder", "preview_frames", "read_prompts", "run_compare", "run_job",
           "split_policies", "validate"]
