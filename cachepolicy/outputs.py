"""What a run writes, and reading it back.

``DIR/run.json``      model, resolved policies with every parameter, seeds, prompts, sampler, versions,
                      ``status`` (``running`` -> ``completed`` | ``failed``) and the error if any.
``DIR/trace.jsonl``   one JSON object per chunk, appended and flushed as each chunk finishes.
``DIR/latents.safetensors``  key ``latents``, ``[B, C, F, H, W]`` float32; written atomically at the end,
                      or with the chunks finished so far when the run fails.
``DIR/video.mp4``, ``DIR/video.gif``  the decoded frames (samples side by side), when the model has a
                      decoder.

Files are replaced atomically (write to a temporary file, then rename), so a crash never leaves a
half-written ``run.json`` or latents file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cachepolicy.errors import CachePolicyError, ParameterError, RolloutConfigError

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


def check_video_columns(columns: Any) -> None:
    """Raise :class:`ParameterError` unless ``columns`` (samples per row of the videos) is None or an int >= 1."""
    if columns is not None and (not isinstance(columns, int) or isinstance(columns, bool) or columns < 1):
        raise ParameterError(f"video columns must be a positive integer (samples per row), got {columns!r}")


def save_videos(folder: Path, frames: Any, fps: int = 8, min_size: int = 128,
                columns: int | None = None) -> list[Path]:
    """Write ``video.mp4`` and ``video.gif`` of decoded frames ``[B, T, 3, H, W]`` in [0, 1].

    Samples are laid side by side, in rows of ``columns`` samples (None: one row), left to right then top
    to bottom; slots past the last sample stay black. Small frames are enlarged (nearest neighbour) to at
    least ``min_size`` pixels high so that they can be seen. The MP4 uses the ffmpeg that
    ``imageio-ffmpeg`` ships.
    """
    import imageio.v3 as iio
    import numpy as np
    import torch

    check_video_columns(columns)
    video = frames.detach().float().cpu().clamp(0, 1)
    batch, steps, _, height, width = video.shape
    scale = max(1, -(-min_size // height))
    if scale > 1:
        video = torch.nn.functional.interpolate(video.flatten(0, 1), scale_factor=scale, mode="nearest")
        video = video.unflatten(0, (batch, steps))
    per_row = batch if columns is None else min(columns, batch)
    rows = -(-batch // per_row)
    if rows * per_row > batch:  # black slots after the last sample
        video = torch.cat([video, video.new_zeros((rows * per_row - batch, *video.shape[1:]))])
    # [rows * per_row, T, 3, h, w] -> [T, 3, rows * h, per_row * w]
    video = torch.cat([torch.cat(list(video[r * per_row:(r + 1) * per_row]), dim=-1) for r in range(rows)], dim=-2)
    pixels = (video.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    pixels = np.ascontiguousarray(pixels[:, : pixels.shape[1] // 2 * 2, : pixels.shape[2] // 2 * 2])
    written = []
    gif = folder / "video.gif"
    atomic_write_bytes(gif, iio.imwrite("<bytes>", pixels, extension=".gif", duration=1000 // fps, loop=0))
    written.append(gif)
    mp4 = folder / "video.mp4"
    atomic_write_bytes(mp4, _mp4_bytes(pixels, fps))
    written.append(mp4)
    return written


def _mp4_bytes(pixels: Any, fps: int) -> bytes:
    """H.264 MP4 of ``pixels`` ``[T, H, W, 3]`` uint8 through imageio-ffmpeg's bundled ffmpeg."""
    import tempfile as _tempfile

    import imageio_ffmpeg

    with _tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        height, width = pixels.shape[1:3]
        writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p", macro_block_size=1, quality=8)
        writer.send(None)
        for frame in pixels:
            writer.send(frame.tobytes())
        writer.close()
        return path.read_bytes()
