"""A warm worker that forks one fresh child per run: process isolation without paying the imports.

`compare(fresh_process=True)` runs each configuration in its own process, so a run's peak memory
(ru_maxrss) is its own and nothing of one run leaks into the next. Starting `python` for every run
costs 5 to 7 seconds of importing torch and transformers on a 2-core machine, before any training:
over a notebook of thirty runs, minutes.

The server imports peftkit once and then does nothing but wait. For each request it `os.fork()`s a
child that sets its thread count, trains, writes its result row and exits. Forking is safe here
because the server never ran a tensor operation, so no OpenMP thread pool exists to be broken by
the fork. The child starts from the imported footprint, exactly as a new interpreter does after
its imports, so peak-memory figures stay comparable with the per-process path
(`tests/test_forkserver.py` checks that the rows agree).

Requests and replies are JSON lines; nothing is pickled. A child's stdout is sent to stderr so a
stray print cannot corrupt the protocol. When the parent goes away, the server reads end-of-file
and exits. Linux only (fork after importing torch is not safe on macOS); elsewhere, and with
PEFTKIT_FORKSERVER=0, `compare` starts one interpreter per run as before.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: peftkit/<layer>/<module>.py


def available() -> bool:
    """Whether runs may be forked from a warm server here (Linux, and not switched off)."""
    return sys.platform.startswith("linux") and os.environ.get("PEFTKIT_FORKSERVER", "1") != "0"


class WorkerError(RuntimeError):
    """A run failed in its child process, or the server died; the message carries the traceback's tail."""


class WarmServer:
    """One server process; `run(spec)` forks a child for `spec` and returns its result row."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self.environ = dict(os.environ)  # what a new interpreter would inherit now; a change restarts the server
        env = dict(self.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self._log = tempfile.TemporaryFile(mode="w+")  # the server's stderr: read back only on failure
        self._proc = subprocess.Popen([sys.executable, "-m", "peftkit.studies.forkserver"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=str(ROOT))
        self._lock = threading.Lock()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def _tail(self) -> str:
        self._log.seek(0)
        return "\n".join(self._log.read().strip().splitlines()[-8:])

    def run(self, spec: dict) -> dict:
        with self._lock:
            try:
                self._proc.stdin.write(json.dumps({"spec": spec, "threads": self.threads}, default=str) + "\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                self.close()
                raise WorkerError(f"the warm worker process died (exit status {self._proc.poll()}):\n{self._tail()}")
            reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply["row"]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()


_SERVER: WarmServer | None = None
STARTS = 0  # servers started by this process (a test checks that runs reuse one)


def server(threads: int | None) -> WarmServer:
    """This process's warm server for `threads`: started on first use, and restarted if it died, if
    `threads` changed, or if the environment changed since it started (a child sees the environment
    of its server, as a new interpreter would see this process's)."""
    global _SERVER, STARTS
    if (_SERVER is None or not _SERVER.alive() or _SERVER.threads != threads
            or _SERVER.environ != dict(os.environ)):
        if _SERVER is not None:
            _SERVER.close()
        _SERVER = WarmServer(threads)
        STARTS += 1
    return _SERVER


def shutdown() -> None:
    global _SERVER
    if _SERVER is not None:
        _SERVER.close()
        _SERVER = None


atexit.register(shutdown)


# --- the server side -------------------------------------------------------------------------

def _child(request: dict, write_fd: int) -> None:
    """In the forked child: train, write one JSON reply to `write_fd`, and never return."""
    status = 0
    try:
        os.dup2(2, 1)  # the child's prints go to stderr, never into the reply channel
        import torch

        from .experiments import run_spec
        if request.get("threads"):
            torch.set_num_threads(int(request["threads"]))
        reply = {"row": run_spec(request["spec"])}
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent as text
        tail = "".join(traceback.format_exception(err)).strip().splitlines()[-8:]
        reply, status = {"error": "the run failed in its child process:\n" + "\n".join(tail)}, 1
    try:
        with os.fdopen(write_fd, "w") as out:
            out.write(json.dumps(reply, default=str))
    finally:
        os._exit(status)


def serve() -> int:
    """Import everything once, then fork one child per request line on stdin."""
    replies = os.fdopen(os.dup(1), "w")  # the reply channel: the original stdout
    os.dup2(2, 1)  # anything else printed goes to stderr
    from . import experiments  # noqa: F401 - the imports every child inherits
    gc.freeze()  # the imports outlive every child: full collections in a child walk only the child's objects
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(request, write_fd)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            text = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            code = os.waitstatus_to_exitcode(status)
            text = json.dumps({"error": f"the run's child process ended without a result (exit code {code}"
                                        + (f", signal {-code}" if code < 0 else "") + ")."})
        replies.write(text + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve())
