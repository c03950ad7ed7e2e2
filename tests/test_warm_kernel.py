"""Kernels forked from a warm zygote (peftkit/notebook/warm_kernel.py): what a batch run's kernels start from.

Each test starts real processes: the zygote, the launcher jupyter_client runs, the forked kernel."""

import json
import os
import signal
import socket
import time

import nbformat
import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from peftkit.notebook import warm_kernel
from peftkit.notebook.batch_run import _local_kernel_manager

pytestmark = pytest.mark.skipif(not warm_kernel.available(), reason="kernels are forked on Linux only")

PROBE = ("import gc, os, sys\n"
         "warm = 'torch' in sys.modules and 'transformers' in sys.modules\n"
         "from peftkit.training import loop\n"
         "import tqdm.notebook, plotly.io as pio\n"
         "print(json.dumps({'warm': warm, 'widget_bars': issubclass(loop.tqdm, tqdm.notebook.tqdm_notebook),\n"
         "                  'renderer': pio.renderers.default, 'cwd': os.getcwd(), 'probe': os.environ.get('PEFTKIT_QUICK'),\n"
         "                  'pid': os.getpid(), 'frozen': gc.get_freeze_count(), 'cap': os.environ.get('PEFTKIT_THREADS')}))")


def _run(cells, cwd):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, kernel_name="python3", kernel_manager_class=_local_kernel_manager(),
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _probe(nb):
    return json.loads(nb.cells[-1].outputs[0]["text"])


def test_kernels_start_warm_and_behave_as_fresh_ones(tmp_path, monkeypatch):
    """A kernel starts with torch and transformers imported, in the notebook's folder and environment (a per-kernel
    variable may differ from the zygote's), with tqdm's widget bars in peftkit and plotly's kernel renderer, as a
    fresh kernel has; a second kernel reuses the zygote and starts from it too."""
    monkeypatch.setenv("PEFTKIT_QUICK", "1")
    starts = warm_kernel.STARTS
    first = _probe(_run(["import json", PROBE], tmp_path))
    assert first == {**first, "warm": True, "widget_bars": True, "renderer": "plotly_mimetype",
                     "cwd": str(tmp_path.resolve()), "probe": "1"}
    assert first["frozen"] > 100_000  # the zygote's imports are out of the collector's sight (gc.freeze)
    monkeypatch.setenv("PEFTKIT_QUICK", "0")  # per kernel: the same zygote serves
    monkeypatch.setenv("PEFTKIT_THREADS", "1")  # so does a kernel capped by `peftkit run --jobs`
    second = _probe(_run(["import json", PROBE], tmp_path))
    assert second["warm"] and second["probe"] == "0" and second["pid"] != first["pid"] and second["cap"] == "1"
    assert warm_kernel.STARTS == starts + 1


def test_switched_off_kernels_start_cold(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_WARM_KERNEL", "0")
    assert _probe(_run(["import json", PROBE], tmp_path))["warm"] is False


def _request(zygote, env):
    """Ask the zygote for a kernel as the launcher does, with these standard streams and environment."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60)
        conn.connect(zygote.socket_path)
        with open(os.devnull, "rb") as null:
            fds = [null.fileno()] * 3
            socket.send_fds(conn, [(json.dumps({"argv": [], "cwd": "/", "env": env, "launcher": os.getpid()}) + "\n")
                                   .encode()], fds)
        return json.loads(conn.makefile().readline())


def test_a_different_environment_is_refused_and_the_launcher_falls_back(tmp_path, monkeypatch):
    """A variable a module may read on import (the result cache's folder) differs: the zygote refuses to fork, naming
    it, and the launcher starts an ordinary kernel instead; the notebook runs either way."""
    zygote = warm_kernel.zygote()
    reply = _request(zygote, {**os.environ, "PEFTKIT_RUNS": str(tmp_path)})
    assert reply == {"refused": "environment differs in ['PEFTKIT_RUNS']"}
    monkeypatch.setattr(warm_kernel, "zygote", lambda: zygote)  # the stale zygote, as a launcher might meet it
    monkeypatch.setenv("PEFTKIT_RUNS", str(tmp_path))
    assert _probe(_run(["import json", PROBE], tmp_path))["warm"] is False


def test_interrupt_reaches_the_kernel_and_killing_the_launcher_ends_it(tmp_path):
    """jupyter_client signals the launcher's process group; the launcher forwards an interrupt to the forked kernel.
    If the launcher is killed outright, the kernel notices and exits, as a kernel whose parent died does."""
    km = _local_kernel_manager()(kernel_name="python3")
    import asyncio

    asyncio.run(km.start_kernel(cwd=str(tmp_path)))
    try:
        kc = BlockingKernelClient(connection_file=km.connection_file)
        kc.load_connection_file()
        # No heartbeat channel: a client that no kernel manager owns calls the kernel dead once a ping goes unanswered
        # for a second, and the first kernel of a new zygote waits for the zygote's imports (seconds) before it answers.
        kc.start_channels(hb=False)
        kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("import time; time.sleep(60)")
        time.sleep(1)
        asyncio.run(km.interrupt_kernel())
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:  # kernel_info's reply, from wait_for_ready
            reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["ename"] == "KeyboardInterrupt"
        # the pid from the reply itself (user_expressions), not from printed output, which may come after the reply
        asked = kc.execute("import os", user_expressions={"pid": "os.getpid()"})
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != asked:
            reply = kc.get_shell_msg(timeout=30)
        kernel_pid = int(reply["content"]["user_expressions"]["pid"]["data"]["text/plain"])
        assert kernel_pid != km.provisioner.process.pid  # forked by the zygote, not the launcher itself
        os.kill(km.provisioner.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and os.path.exists(f"/proc/{kernel_pid}"):
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{kernel_pid}"), "the kernel outlived its launcher"
    finally:
        kc.stop_channels()
        asyncio.run(km.shutdown_kernel(now=True))


def test_an_edit_to_peftkit_restarts_the_zygote(monkeypatch):
    """A forked kernel runs the code its zygote imported: after an edit to peftkit's source, the next kernel comes
    from a new zygote, as a fresh kernel would import the edited code."""
    first = warm_kernel.zygote()
    assert warm_kernel.zygote() is first  # nothing changed: the same one
    stamp = warm_kernel.source_stamp()
    monkeypatch.setattr(warm_kernel, "source_stamp", lambda: (stamp[0], stamp[1] + 1))
    second = warm_kernel.zygote()
    assert second is not first and second.alive() and not first.alive()
