"""Real ``cachepolicy`` processes for the reliability tests, started cheaply.

Each process is forked by a ``forkserver`` that imported ``cachepolicy`` and torch once, and runs
``cachepolicy.cli.main(argv)`` with its standard output and error in files, then exits with its status: a
real process (its own pid, its own signals, killed like any other), without paying the imports each time.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_CONTEXT = None


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["cachepolicy.cli", "cachepolicy.api", "cachepolicy.compare",
                                         "cachepolicy.adapters.wan.tiny"])
    return _CONTEXT


def _main(argv: list[str], cwd: str, stdout: str, stderr: str) -> None:
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    from cachepolicy.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class CliProcess:
    """``cachepolicy ARGV`` running in its own process; ``stdout``/``stderr`` files in ``logs``."""

    def __init__(self, argv: Sequence[str], logs: Path, cwd: Path | None = None) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path = logs / f"stdout-{time.monotonic_ns()}.txt"
        self.stderr_path = self.stdout_path.with_name(self.stdout_path.name.replace("stdout", "stderr"))
        self.process = _context().Process(target=_main, args=([str(a) for a in argv], str(cwd or logs),
                                                              str(self.stdout_path), str(self.stderr_path)))
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, name: str) -> None:
        """Send the signal ``name`` (``"SIGKILL"``, ``"SIGTERM"``, ...), if the process still runs."""
        try:
            os.kill(self.pid, getattr(signal, name))
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 120.0) -> int:
        """The exit status (``-N`` when killed by signal ``N``)."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"cachepolicy {self.process} did not finish in {timeout} s")
        return self.process.exitcode

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text() if self.stdout_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""


def run_cli(argv: Sequence[str], logs: Path, timeout: float = 120.0) -> CliProcess:
    """Run ``cachepolicy ARGV`` to its end in its own process."""
    process = CliProcess(argv, logs)
    process.wait(timeout)
    return process


def wait_until(condition: Callable[[], bool], process: CliProcess, timeout: float = 60.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``process`` ends or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not process.alive():
            return condition()
        time.sleep(0.005)
    return False
