"""What a run writes, and reading it back.

``DIR/run.json``      model, resolved policies with every parameter, seeds, prompts, sampler, versions,
                      ``status`` (``running`` -> ``completed`` | ``failed`` | ``interrupted``) and the error if any.
``DIR/trace.jsonl``   one JSON object per chunk, appended and flushed as each chunk finishes.
``DIR/latents.safetensors``  key ``latents``, ``[B, C, F, H, W]`` float32; written atomically at the end,
                      or with the chunks finished so far when the run fails or is stopped.
``DIR/video.mp4``, ``DIR/video.gif``  the decoded frames (samples side by side), when the model has a
                      decoder.

Files are replaced atomically (write to a temporary file, then rename), so a crash never leaves a
half-written ``run.json`` or latents file; they get the permissions of any new file (``0644`` under the
usual umask). A folder holds one run and nothing else: a run that replaces another is built beside it and
swapped in whole (:mod:`cachepolicy.folders`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from cachepolicy.errors import CachePolicyError, DamagedFolderError, ParameterError, RolloutConfigError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
TRACE_FILE = "trace.jsonl"
LATENTS_FILE = "latents.safetensors"
VIDEO_FILES = ("video.mp4", "video.gif")
#: every file a run folder may hold (names starting with "." are temporary files and are ignored)
RUN_FILES = frozenset({RUN_FILE, TRACE_FILE, LATENTS_FILE, *VIDEO_FILES})
#: the values of ``run.json``'s ``status``
RUN_STATUSES = ("running", "completed", "failed", "interrupted")


@functools.lru_cache(maxsize=1)
def new_file_mode() -> int:
    """The mode a new file gets from ``open()`` in this process (``0o666`` less the umask; the umask is read
    once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600 files; outputs are as readable as any other file
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


def check_writable(folder: Path, what: str = "--out") -> None:
    """Raise :class:`RolloutConfigError` unless ``folder`` is a folder, or can be created as one."""
    if folder.exists() and not folder.is_dir():
        raise RolloutConfigError(f"{what} {folder} exists and is not a folder")
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RolloutConfigError(f"{what} {folder} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RolloutConfigError(f"{what} {folder} cannot be written: no write permission on {parent}")


def run_status(folder: Path) -> str:
    """What ``run.json`` of ``folder`` says, in words, for messages (never raises)."""
    from cachepolicy.folders import holder_of

    try:
        status = json.loads((folder / RUN_FILE).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return "no readable run.json"
    if status == "running" and holder_of(folder) is None:
        return "status 'running' but no process is writing it: it was killed"
    return f"status {status!r}"


def check_run_folder(out: str | Path, force: bool, *, locked: bool = False) -> Path:
    """Check that ``out`` can take a new run, before anything is written; returns it as a :class:`Path`.

    ``out`` must be missing, an empty folder, or (with ``force``) a folder holding a run and nothing else,
    and no other process may be writing it (``locked``: this process holds its lock).
    """
    from cachepolicy.errors import FolderBusyError
    from cachepolicy.folders import holder_of

    folder = Path(out)
    check_writable(folder)
    if not locked and (holder := holder_of(folder)) is not None:
        raise FolderBusyError(folder, holder)
    if not folder.is_dir():
        return folder
    entries = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    foreign = [name for name in entries if name not in RUN_FILES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RolloutConfigError(
            f"{folder} holds files that are not part of a cachepolicy run ({shown}); choose an empty or new "
            f"folder for --out"
        )
    if entries and not force:
        raise RolloutConfigError(
            f"{folder} already holds a run ({', '.join(entries)}; {run_status(folder)}); choose another --out or "
            f"pass --force to replace it"
        )
    return folder


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each line of a JSON-lines file written by appending whole lines.

    A last line without its newline (a write cut by a crash) is ignored with a warning. Any other line
    that is not a JSON object raises :class:`DamagedFolderError` naming the file and the line.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if torn.strip():
        logger.warning("ignoring the unfinished last line %d of %s (a run was killed while writing it)",
                       len(lines) + 1, path)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DamagedFolderError(path, f"not JSON ({exc})", line=number) from None
        if not isinstance(record, dict):
            raise DamagedFolderError(path, f"a JSON {type(record).__name__}, not an object", line=number)
        records.append((number, record))
    return records


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else raises :class:`DamagedFolderError`."""
    try:
        data = json.loads(path.read_bytes())
    except UnicodeDecodeError as exc:
        raise DamagedFolderError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise DamagedFolderError(path, f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DamagedFolderError(path, f"a JSON {type(data).__name__}, not an object")
    return data


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
    """Read a run folder: ``(latents [B, C, F, H, W] or None, run.json dict, trace records)``.

    Every file is checked: a damaged one raises :class:`DamagedFolderError` naming it (and the line of
    ``trace.jsonl``); so do files that disagree with ``run.json`` (another run's trace or latents).
    """
    folder = Path(folder)
    run_path = folder / RUN_FILE
    if not run_path.is_file():
        raise CachePolicyError(f"{folder} holds no {RUN_FILE}: not a cachepolicy run folder")
    run = read_json_object(run_path)
    if run.get("status") not in RUN_STATUSES:
        raise DamagedFolderError(run_path, f"status {run.get('status')!r} is none of {', '.join(RUN_STATUSES)}")
    trace_path = folder / TRACE_FILE
    lines = read_jsonl(trace_path) if trace_path.is_file() else []
    for index, (number, record) in enumerate(lines):
        if record.get("chunk") != index:
            raise DamagedFolderError(trace_path, f"chunk {record.get('chunk')!r} where chunk {index} belongs",
                                     line=number)
    trace = [record for _, record in lines]
    done = run.get("chunks_completed")
    if done is not None and done != len(trace):
        raise DamagedFolderError(trace_path, f"{len(trace)} chunks where {RUN_FILE} says {done}")
    latents = None
    latents_path = folder / LATENTS_FILE
    if latents_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            latents = load_file(latents_path)["latents"]
        except (SafetensorError, KeyError, OSError, ValueError) as exc:
            raise DamagedFolderError(latents_path, f"not a safetensors file with key 'latents' ({exc})") from None
        frames_per_chunk = run.get("frames_per_chunk")
        if done is not None and frames_per_chunk and latents.shape[2] != done * frames_per_chunk:
            raise DamagedFolderError(latents_path, f"{latents.shape[2]} latent frames where {RUN_FILE} says "
                                                   f"{done} chunks of {frames_per_chunk}")
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
