"""Notebook kernels forked from a warm process: a batch run pays torch's and transformers' imports once.

Every notebook's first cell imports torch, transformers, pandas, plotly and peftkit: about 4 seconds of
a 2-core machine before anything runs, paid again by each of the eleven notebooks of a batch run and of
`make test`'s papermill pass. Here one process (the *zygote*) imports all of that once and then waits on
a Unix socket. For each notebook, the kernel manager starts `_kernel_launch.py` (the standard library
alone, some 30 ms) in place of `python -m ipykernel_launcher`; the launcher hands the zygote its
connection file, working directory, environment and standard streams, and the zygote forks a child that
becomes the kernel. To jupyter_client the launcher *is* the kernel process: it forwards the signals it
gets (an interrupt, a terminate) to the child, and exits when the child does; if the launcher is killed,
the child notices (a pidfd) and exits too.

Forking after importing torch is safe because the zygote never runs a tensor operation: no OpenMP pool
exists to be broken (`peftkit.studies.forkserver` relies on the same). Modules read a few environment
variables when they are imported (peftkit's result cache, the Hub's offline switch, OpenMP's thread count),
so the zygote refuses a launcher whose environment differs from its own in anything but the variables a
kernel manager sets per kernel; the launcher then starts an ordinary kernel, and so it does whenever the
zygote cannot be reached. Nothing is pickled: requests and replies are JSON lines.

Linux only (`os.pidfd_open`, and fork after importing torch); elsewhere, and with PEFTKIT_WARM_KERNEL=0,
kernels start as usual.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SOCKET_ENV = "PEFTKIT_KERNEL_ZYGOTE"  # the zygote's socket, in the launcher's environment
LAUNCHER = Path(__file__).with_name("_kernel_launch.py")
# What a kernel manager or a batch run sets per kernel, and what no module reads on import: a launcher
# may differ from the zygote in these and still be forked.
PER_KERNEL = ("JPY_", "PYDEVD_", "KERNEL_", "PEFTKIT_QUICK", "PEFTKIT_THREADS", SOCKET_ENV)
# The imports every kernel inherits: what the notebooks' first cells import. plotly.io loads its renderers
# lazily, on first use, and they import nbformat and jsonschema: 1.2 s of every kernel's start, until listed here.
WARM_IMPORTS = ("torch", "numpy", "pandas", "transformers", "transformers.models.bert.modeling_bert",
                "plotly.graph_objects", "plotly.io", "plotly.io._renderers", "ipywidgets", "IPython",
                "ipykernel.kernelapp", "tqdm.auto", "peftkit", "peftkit.notebook.params", "peftkit.notebook.prose",
                "peftkit.studies.experiments")


def available() -> bool:
    """Whether kernels may be forked from a zygote here (Linux with pidfd_open, and not switched off)."""
    return (sys.platform.startswith("linux") and hasattr(os, "pidfd_open")
            and os.environ.get("PEFTKIT_WARM_KERNEL", "1") != "0")


def comparable(env: dict) -> dict:
    """The part of an environment that must match the zygote's for a fork to be what a new interpreter is."""
    return {k: v for k, v in env.items() if not k.startswith(PER_KERNEL)}


def source_stamp() -> tuple[int, int]:
    """peftkit's source as of now (how many .py files, the latest modification): a kernel forked from a zygote
    runs the code the zygote imported, so an edit since then must restart it, as a fresh kernel would import
    the edited code."""
    times = [f.stat().st_mtime_ns for f in Path(__file__).resolve().parents[1].rglob("*.py")]
    return len(times), max(times, default=0)


class Zygote:
    """One warm process listening on a private Unix socket; `kernel_cmd` names the launcher that uses it."""

    def __init__(self):
        self.environ = dict(os.environ)
        self.source = source_stamp()
        self._dir = tempfile.mkdtemp(prefix="peftkit-zygote-")  # mode 0700: only this user can connect
        self.socket_path = os.path.join(self._dir, "zygote.sock")
        self._log = tempfile.TemporaryFile(mode="w+")
        # Its own session: a Ctrl-C in the terminal interrupts the batch run, not the zygote under it. The
        # environment is os.environ's, as a kernel manager passes it: the C-level one may differ (GNU readline,
        # imported by a debugger or IPython, exports LINES and COLUMNS there).
        self._proc = subprocess.Popen([sys.executable, "-m", "peftkit.notebook.warm_kernel", self.socket_path],
                                      stdin=subprocess.PIPE, stdout=self._log, stderr=self._log,
                                      env=dict(self.environ), start_new_session=True)
        # The first launcher may come at once: wait for the socket, which the zygote binds before its imports.
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket_path) and self._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def alive(self) -> bool:
        return self._proc.poll() is None

    def kernel_cmd(self, kernel_args: list[str]) -> list[str]:
        """The command that starts a kernel with ipykernel's arguments `kernel_args` (-f CONNECTION_FILE ...)."""
        return [sys.executable, str(LAUNCHER), self.socket_path, *kernel_args]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()  # end of file: the zygote exits; forked kernels live on
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        Path(self.socket_path).unlink(missing_ok=True)
        os.rmdir(self._dir) if os.path.isdir(self._dir) and not os.listdir(self._dir) else None


_ZYGOTE: Zygote | None = None
_LOCK = threading.Lock()
STARTS = 0  # zygotes started by this process (a test checks that kernels reuse one)


def zygote() -> Zygote | None:
    """This process's zygote, started on first use and restarted if it died, the environment changed or
    peftkit's source did; None where kernels cannot be forked."""
    global _ZYGOTE, STARTS
    if not available():
        return None
    with _LOCK:  # kernels started at once, from threads, share one
        if (_ZYGOTE is None or not _ZYGOTE.alive() or comparable(_ZYGOTE.environ) != comparable(dict(os.environ))
                or _ZYGOTE.source != source_stamp()):
            if _ZYGOTE is not None:
                _ZYGOTE.close()
            _ZYGOTE = Zygote()
            STARTS += 1
        return _ZYGOTE


def shutdown() -> None:
    global _ZYGOTE
    if _ZYGOTE is not None:
        _ZYGOTE.close()
        _ZYGOTE = None


atexit.register(shutdown)


# --- the zygote's side ----------------------------------------------------------------------

def _watch(pidfds: list[int]) -> None:
    """In a kernel: exit when the launcher (the process jupyter_client manages) or the kernel manager's
    process is gone, as ipykernel's parent poller makes an ordinary kernel do."""
    import select

    select.select(pidfds, [], [])
    os._exit(1)


def _become_kernel(request: dict, fds: list[int], conn: socket.socket, listener: socket.socket) -> None:
    """In the forked child: take the launcher's streams, directory and environment, and run ipykernel."""
    status = 0
    try:
        listener.close()
        conn.close()
        os.setsid()  # out of the zygote's process group, as a kernel the manager started would be
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        watched = {int(request["launcher"]), int(request["env"].get("JPY_PARENT_PID") or 0)} - {0, 1}
        threading.Thread(target=_watch, args=([os.pidfd_open(p) for p in watched],), daemon=True).start()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # ipykernel's own parent poller compares its parent with JPY_PARENT_PID, and this kernel's parent is
        # the zygote: it is switched off (1: "no parent to poll"), and the watcher above does its work.
        # The extension (`load_ipython_extension` below) redoes, once the shell exists, what modules chose on import
        # without one.
        argv = [*request["argv"], "--IPKernelApp.parent_handle=1", f"--IPKernelApp.extra_extensions={__spec__.name}"]
        sys.argv = [sys.executable, *argv]
        from ipykernel import kernelapp

        kernelapp.launch_new_instance(argv=argv)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0
    except BaseException:  # noqa: BLE001 - the traceback goes to the kernel's stderr, as a failing kernel's would
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(status)


# plotly's choice of renderer in an IPython kernel, by the variable that marks a notebook front end
_PLOTLY_HOSTS = (("COLAB_NOTEBOOK_ID", "colab"), ("AZURE_NOTEBOOKS_HOST", "azure"), ("VSCODE_PID", "vscode"),
                 ("NTERACT_EXE", "nteract"), ("COCALC_PROJECT_ID", "cocalc"), ("DATABRICKS_RUNTIME_VERSION", "databricks"))


def load_ipython_extension(ipython) -> None:
    """In a forked kernel, once its shell exists: what modules decided when the zygote imported them, with
    no shell, is decided again as a fresh kernel's imports would.

    - tqdm.auto chose its console bars (no kernel then): it is imported afresh, and the modules that took
      `tqdm` from it (peftkit's, optuna's) get the notebook's widget bars.
    - plotly chose a browser renderer: it gets the one plotly picks in a kernel."""
    import importlib

    console_bar = getattr(sys.modules.get("tqdm.auto"), "tqdm", None)
    for name in ("tqdm.auto", "tqdm.autonotebook"):
        sys.modules.pop(name, None)
    widget_bar = importlib.import_module("tqdm.auto").tqdm
    for name, module in list(sys.modules.items()):  # peftkit's modules, and any other that took `tqdm` from it
        if console_bar is not None and not name.startswith("tqdm") and getattr(module, "tqdm", None) is console_bar:
            module.tqdm = widget_bar
    if "plotly.io" in sys.modules and not os.environ.get("PLOTLY_RENDERER"):
        hosted = [r for var, r in _PLOTLY_HOSTS if var in os.environ] + (["kaggle"] if os.path.exists("/kaggle/input") else [])
        sys.modules["plotly.io"].renderers.default = hosted[0] if hosted else "plotly_mimetype"


def _reply(conn: socket.socket, message: dict) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def serve(path: str) -> int:
    """Import once, then fork one kernel per launcher that connects; exit at end of file on stdin."""
    import importlib

    # Listen first: the first launcher connects at once and waits in the queue while the imports run.
    import select

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    for name in WARM_IMPORTS:
        importlib.import_module(name)
    # The imports' ~450,000 objects live as long as the kernel: move them out of the collector's sight. Every full
    # collection in a kernel (each in-process run opens with one, `runtime.reset_peak_memory`) then walks only what
    # the kernel made itself: 0.24 s before, well under 0.01 s after, measured with these imports. Forked children
    # also stop writing to the pages they share with the zygote when the collector marks objects.
    gc.freeze()
    mine = comparable(dict(os.environ))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # kernels are reaped as they exit
    # One thread only, so that a fork copies no lock another thread holds: the end of the batch run (end of file
    # on stdin, read from the descriptor, not through sys.stdin's buffer) is watched here, beside the socket.
    while True:
        ready, _, _ = select.select([listener, 0], [], [])
        if 0 in ready:
            if not os.read(0, 4096):
                return 0
            continue
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            while not data.endswith(b"\n"):
                more = conn.recv(1 << 20)
                if not more:
                    break
                data += more
            request = json.loads(data)
            theirs = comparable(request.get("env", {}))
            if theirs != mine or len(fds) != 3:
                changed = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
                _reply(conn, {"refused": f"environment differs in {changed[:5]}" if changed else "no streams"})
                continue
            pid = os.fork()
            if pid == 0:
                _become_kernel(request, fds, conn, listener)
            _reply(conn, {"pid": pid})
        except (OSError, ValueError) as e:  # a launcher that went away or sent garbage: the next one is served
            try:
                _reply(conn, {"refused": str(e)})
            except OSError:
                pass
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            conn.close()


if __name__ == "__main__":
    raise SystemExit(serve(sys.argv[1]))
