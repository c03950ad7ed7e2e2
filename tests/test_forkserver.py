"""The warm fork server gives the same rows as a new interpreter per run, and reports failures."""

import dataclasses
import os
from pathlib import Path
import signal
import sys
import threading
import time

import pytest

import peftkit as pk
from peftkit.studies import experiments as E
from peftkit.studies import forkserver
from peftkit.training.loop import TrainConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux-only")

CFG = TrainConfig(epochs=1, batch_size=8, lr=5e-3, progress=False)


def _spec(**kw):
    spec = E.make_spec(pk.LoRA(r=4, alpha=8), base="tiny", domain="tweets", n_train=32, cfg=CFG,
                       eval_domains=False, n_eval=40)
    return {**spec, "cfg": dataclasses.asdict(CFG), "out": None, "split_seed": 0, **kw}


def test_forked_run_matches_a_new_interpreter(monkeypatch):
    monkeypatch.setenv("PEFTKIT_FORKSERVER", "0")
    fresh = E._run_in_subprocess(_spec(), 1)
    monkeypatch.setenv("PEFTKIT_FORKSERVER", "1")
    starts = forkserver.STARTS
    forked = [E._run_in_subprocess(_spec(), 1) for _ in range(2)]
    assert forkserver.STARTS == starts + 1  # the second run reused the warm server
    for row in forked:
        for k in ("final_loss", "accuracy", "correct", "steps", "trainable", "adapter_bytes"):
            assert row[k] == fresh[k], k
        assert row["peak_mem_mib"] > 0
    # each child starts from the server's imported footprint, not from the previous run's peak
    assert abs(forked[1]["peak_mem_mib"] - forked[0]["peak_mem_mib"]) < 0.25 * forked[0]["peak_mem_mib"]
    forkserver.shutdown()


def test_a_failing_run_is_reported_and_the_server_survives(monkeypatch):
    monkeypatch.setenv("PEFTKIT_FORKSERVER", "1")
    with pytest.raises(RuntimeError, match="failed in its subprocess") as err:
        E._run_in_subprocess(_spec(base="no-such-base"), 1)
    assert "no-such-base" in str(err.value)  # the child's own error, not a bare exit code
    server = forkserver.server(1)
    assert server.alive()
    assert E._run_in_subprocess(_spec(), 1)["steps"] == 4
    assert forkserver.server(1) is server  # the same warm process served both
    monkeypatch.setenv("PEFTKIT_TEST_MARKER", "1")  # a new interpreter would see this: so must the next child
    assert forkserver.server(1) is not server and not server.alive()
    forkserver.shutdown()


def _children(pid: int) -> list[int]:
    """The server's forked run children: same command line as the server. Anything else it starts
    (a short-lived helper process during its imports, say) is not the run, and killing it would let
    the run finish: under load that made this test flaky."""
    def cmdline(p):
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return None
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    own = cmdline(pid)
    return [k for k in kids if cmdline(k) == own]


def test_a_child_killed_mid_run_is_an_error_not_a_hang():
    server = forkserver.WarmServer(1)
    result = {}

    def go():
        try:
            result["row"] = server.run(_spec(n_train=3000, n_eval=None))  # valid and long: the kill comes first
        except forkserver.WorkerError as err:
            result["error"] = str(err)

    worker = threading.Thread(target=go)
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while not _children(server._proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _children(server._proc.pid):
            os.kill(pid, signal.SIGKILL)
        worker.join(timeout=120)
        assert "without a result" in result.get("error", ""), result
        assert "signal 9" in result["error"]
        assert server.alive()  # the server itself carries on
    finally:
        server.close()
