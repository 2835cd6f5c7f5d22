"""The grid's text inputs: seeds (``0-7,9``), prompts (a file or ``;``-separated) and policy specs."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from cachepolicy.errors import CompareConfigError


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0-7"``, ``"0,3,5"`` or ``"0-3,8"`` -> seeds, in order, without repeats."""
    seeds: list[int] = []
    if not isinstance(text, str) or not text.strip():
        raise CompareConfigError(f"no seeds in {text!r}; write e.g. '0-7' or '0,3,5'")
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise CompareConfigError(f"cannot parse seeds {text!r} at {part!r}; write e.g. '0-7' or '0,3,5'")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise CompareConfigError(f"seed range {part!r} runs backwards; write {high}-{low}")
        seeds.extend(s for s in range(low, high + 1) if s not in seeds)
    return tuple(seeds)


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
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
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
