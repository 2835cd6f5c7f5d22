"""What a run writes, and reading it back.

``DIR/run.json``      model, resolved policies with every parameter, seeds, prompts, sampler, versions,
                      ``status`` (``running`` -> ``completed`` | ``failed``) and the error if any.
``DIR/trace.jsonl``   one JSON object per chunk, appended and flushed as each chunk finishes.
``DIR/latents.safetensors``  key ``latents``, ``[B, C, F, H, W]`` float32; written atomically at the end,
                      or with the chunks finished so far when the run fails.

Files are replaced atomically (write to a temporary file, then rename), so a crash never leaves a
half-written ``run.json`` or latents file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cachepolicy.errors import CachePolicyError, RolloutConfigError

RUN_FILE = "run.json"
TRACE_FILE = "trace.jsonl"
LATENTS_FILE = "latents.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def prepare_run_dir(out: str | Path, force: bool) -> Path:
    """Create ``out``; refuse a folder that already holds a run unless ``force``."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RolloutConfigError(f"output path {folder} exists and is not a folder")
    existing = [name for name in (RUN_FILE, TRACE_FILE, LATENTS_FILE) if (folder / name).exists()]
    if existing and not force:
        raise RolloutConfigError(
            f"{folder} already holds a run ({', '.join(existing)}); choose another --out or pass --force to replace it"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if force:
        (folder / TRACE_FILE).unlink(missing_ok=True)
    return folder


class TraceWriter:
    """Appends one JSON line per chunk and flushes it, so a killed run keeps every finished chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")

    def __call__(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def save_latents(path: Path, latents: Any, metadata: dict[str, str] | None = None) -> None:
    """Save ``latents`` ``[B, C, F, H, W]`` as safetensors key ``latents`` (float32, atomic)."""
    from safetensors.torch import save

    tensor = latents.detach().to("cpu").float().contiguous()
    atomic_write_bytes(path, save({"latents": tensor}, metadata=metadata or {}))


def read_run(folder: str | Path) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """Read a run folder: ``(latents [B, C, F, H, W], run.json dict, trace records)``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    run_path = folder / RUN_FILE
    if not run_path.is_file():
        raise CachePolicyError(f"{folder} holds no {RUN_FILE}: not a cachepolicy run folder")
    run = json.loads(run_path.read_text())
    trace = []
    trace_path = folder / TRACE_FILE
    if trace_path.is_file():
        trace = [json.loads(line) for line in trace_path.read_text().splitlines() if line.strip()]
    latents = load_file(folder / LATENTS_FILE)["latents"] if (folder / LATENTS_FILE).is_file() else None
    return latents, run, trace
