"""The grid's text inputs: seeds (``0-7,9``), prompts (a file or ``;``-separated) and policy specs."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from cachepolicy.errors import CompareConfigError, ParameterError


#: the most jobs one comparison takes (the driver holds its grid in memory, the report a panel per job)
MAX_JOBS = 100_000


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-7"``, ``"0,3,5"`` or ``"0-3,8"`` -> seeds, in order, without repeats; each seed in
    ``[0, 2**63)`` (what the noise generator takes), at most :data:`MAX_JOBS` of them."""
    from cachepolicy.validation import INT64_MAX

    if not isinstance(text, str) or not text.strip():
        raise CompareConfigError(f"no seeds in {text!r}; write e.g. '0-7' or '0,3,5'")
    ranges = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise CompareConfigError(f"cannot parse seeds {text!r} at {part!r}; write e.g. '0-7' or '0,3,5'")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise CompareConfigError(f"seed range {part!r} runs backwards; write {high}-{low}")
        if high > INT64_MAX:
            raise CompareConfigError(f"seed {high} in {part!r} is too large: seeds are integers in [0, 2**63)")
        ranges.append((low, high))
    count = sum(high - low + 1 for low, high in ranges)
    if count > MAX_JOBS:
        raise CompareConfigError(f"seeds {text!r} name {count} seeds; a comparison takes at most {MAX_JOBS} jobs")
    return tuple(dict.fromkeys(seed for low, high in ranges for seed in range(low, high + 1)))


def read_prompts(text: str) -> tuple[str, ...]:
    """A prompts file (one per line, ``#`` comments) if ``text`` names one, else ``;``-separated prompts.

    Text that looks like a path (ends in ``.txt``/``.jsonl``/``.csv`` or contains a path separator) must be
    an existing, non-empty file.
    """
    if not isinstance(text, str) or not text.strip():
        raise CompareConfigError("no prompts given; pass a prompts file or 'prompt one; prompt two'")
    path = Path(text)
    looks_like_path = text.endswith((".txt", ".jsonl", ".csv")) or os.sep in text
    if path.is_file():
        from cachepolicy.validation import read_text_file

        try:
            content = read_text_file(path, "prompts file")
        except ParameterError as exc:
            raise CompareConfigError(str(exc)) from None
        prompts = [line.strip() for line in content.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
        if not prompts:
            raise CompareConfigError(f"prompts file {path} holds no prompt (one per line; '#' starts a comment)")
        return tuple(dict.fromkeys(prompts))
    if looks_like_path:
        raise CompareConfigError(f"prompts file {text} does not exist")
    prompts = [p.strip() for p in text.split(";") if p.strip()]
    if not prompts:
        raise CompareConfigError(f"no prompts in {text!r}")
    return tuple(dict.fromkeys(prompts))


def split_policies(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"SPEC; SPEC; ..."`` -> one composed spec per compared policy."""
    parts = [text] if isinstance(text, str) else list(text)
    specs = [s.strip() for part in parts for s in part.split(";") if s.strip()]
    if not specs:
        raise CompareConfigError("no policies to compare; write e.g. --policies 'full; sliding-window:frames=12'")
    return tuple(specs)
