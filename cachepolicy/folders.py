"""Ownership of output folders: one writer at a time, whole replacement, leftovers of dead processes.

A folder ``DIR`` is owned through the lock file ``.DIR.lock`` beside it (in ``DIR``'s parent, so that the
lock outlives a swap of ``DIR`` itself). The owner holds an exclusive ``flock`` on that file and writes into
it who it is: pid, host, start time and command. The kernel drops the ``flock`` when the owner dies, however
it dies (``SIGKILL`` included), so a lock file left behind by a dead process is recovered by the next writer
(with a warning naming the dead holder), while a live holder makes a second writer fail at once with
:class:`~cachepolicy.errors.FolderBusyError`. The owner removes the file when it is done.

A run that replaces another is built in ``.DIR.new-<token>`` beside ``DIR`` and swapped in whole
(:func:`swap_in`): ``DIR`` is renamed to ``.DIR.old-<token>``, the new folder to ``DIR``, the old one removed.
Stops requested by signal wait until both renames are done (:func:`deferred_stops`); a process killed
between them leaves ``DIR`` missing and the old folder beside it: :func:`recover_leftovers`, which every
writer runs once it holds the lock, puts the old folder back, and removes the unfinished new folders of dead
writers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cachepolicy.errors import FolderBusyError, StopRequested

logger = logging.getLogger(__name__)


def absolute(folder: str | os.PathLike[str]) -> Path:
    """``folder`` made absolute without resolving symbolic links (``runs/x/`` -> ``/cwd/runs/x``)."""
    return Path(os.path.abspath(os.fspath(folder)))


def lock_path(folder: str | os.PathLike[str]) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` in its parent."""
    folder = absolute(folder)
    return folder.parent / f".{folder.name}.lock"


def _sibling(folder: Path, kind: str, token: str) -> Path:
    return folder.parent / f".{folder.name}.{kind}-{token}"


def _siblings(folder: Path, kind: str) -> list[Path]:
    prefix = f".{folder.name}.{kind}-"
    if not folder.parent.is_dir():
        return []
    return sorted(folder.parent / name for name in os.listdir(folder.parent) if name.startswith(prefix))


class FolderLock:
    """The exclusive right to write ``folder`` (see the module docstring). Use as a context manager.

    ``command`` (e.g. ``"cachepolicy compare"``) is written into the lock for the message a second writer
    gets. After :meth:`acquire`, ``stale`` holds what a dead holder had written (None when there was none).
    """

    def __init__(self, folder: str | os.PathLike[str], command: str) -> None:
        self.folder = absolute(folder)
        self.path = lock_path(self.folder)
        self.command = command
        self.stale: dict[str, Any] | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any]:
        """What this process writes into the lock: pid, host, start time (ISO 8601), command."""
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}

    def acquire(self) -> None:
        """Take the lock, or raise :class:`FolderBusyError` naming the live holder."""
        import fcntl

        if self._fd is not None:
            raise RuntimeError(f"the lock of {self.folder} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        attempts = 0
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                attempts += 1
                if attempts < 10:  # a reader's look (holder_of) holds it for microseconds: try again
                    os.close(fd)
                    time.sleep(0.02)
                    continue
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderBusyError(self.folder, holder) from None
            except BaseException:
                os.close(fd)
                raise
            # the previous holder may have removed the file between our open and our flock: start again
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            previous = _read_holder(fd, wait=0.0)
            self.stale = previous or None
            if self.stale:
                logger.warning("%s was left locked by %s, which is no longer running: lock recovered", self.folder,
                               _describe(self.stale))
            data = json.dumps(self.holder()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing happens when it is not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(holder: dict[str, Any]) -> str:
    parts = [f"{key} {holder[key]}" for key in ("command", "pid", "host", "started") if holder.get(key)]
    return ", ".join(parts) or "an unknown process"


def _read_holder(fd: int, wait: float = 0.5) -> dict[str, Any]:
    """The holder a lock file names; a holder that has just taken the lock may not have written yet, so
    an empty or partial content is read again for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        data = os.pread(fd, 4096, 0)
        try:
            holder = json.loads(data) if data.strip() else None
        except ValueError:
            holder = None
        if isinstance(holder, dict):
            return holder
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.02)


def holder_of(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the lock of ``folder`` now (None when nobody does); reading takes no lock."""
    import fcntl

    path = lock_path(folder)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


_DEFERRAL = {"depth": 0, "pending": None}


def request_stop(signal_name: str) -> None:
    """What the handler of a stop signal calls: raise :class:`~cachepolicy.errors.StopRequested` now, or,
    inside :func:`deferred_stops`, when that block ends."""
    if _DEFERRAL["depth"]:
        _DEFERRAL["pending"] = signal_name
        return
    raise StopRequested(signal_name)


@contextlib.contextmanager
def deferred_stops() -> Iterator[None]:
    """Hold back stops requested through :func:`request_stop` (the CLI's ``SIGINT``, ``SIGTERM`` and
    ``SIGHUP``) until the block ends, so that a stop cannot land between the steps of a swap; ``SIGKILL``
    still can (:func:`recover_leftovers` repairs it)."""
    _DEFERRAL["depth"] += 1
    try:
        yield
    finally:
        _DEFERRAL["depth"] -= 1
    pending = _DEFERRAL["pending"]
    if pending is not None and not _DEFERRAL["depth"]:
        _DEFERRAL["pending"] = None
        raise StopRequested(pending)


def new_staging(folder: str | os.PathLike[str]) -> Path:
    """A new, empty ``.NAME.new-<token>`` folder beside ``folder``, where a replacement is built."""
    folder = absolute(folder)
    path = _sibling(folder, "new", secrets.token_hex(4))
    path.mkdir(parents=True)
    return path


def swap_in(staging: Path, folder: str | os.PathLike[str]) -> None:
    """Put ``staging`` in the place of ``folder``, which is removed whole (see the module docstring)."""
    folder = absolute(folder)
    if not folder.exists():
        os.replace(staging, folder)
        return
    old = _sibling(folder, "old", secrets.token_hex(4))
    with deferred_stops():
        os.replace(folder, old)
        os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_leftovers(folder: str | os.PathLike[str]) -> list[str]:
    """Undo what dead writers of ``folder`` left beside it; call with the folder's lock held.

    An old folder whose swap was cut between its two renames goes back in place (when ``folder`` is
    missing) or is removed (when the swap finished); unfinished replacements are removed. Returns one
    line per action (each is also logged).
    """
    folder = absolute(folder)
    actions = []
    for old in _siblings(folder, "old"):
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            actions.append(f"removed {old.name}, the previous contents of {folder} after a finished replacement")
        else:
            os.replace(old, folder)
            actions.append(f"put back {folder} from {old.name}: a replacement was killed while swapping folders")
    for new in _siblings(folder, "new"):
        shutil.rmtree(new, ignore_errors=True)
        actions.append(f"removed {new.name}, an unfinished replacement of {folder} whose process was killed")
    for line in actions:
        logger.warning("%s", line)
    return actions
