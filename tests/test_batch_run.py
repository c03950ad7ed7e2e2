"""The batch runner's lanes (`peftkit run --jobs N`): scheduling, the environment the kernels inherit, failures."""

import json
import os
import threading
from pathlib import Path

import pytest

from peftkit.notebook import batch_run as B, lanes as L
from peftkit.runtime import THREADS_ENV


def _paths(*names):
    return [Path(f"/nb/{n}") for n in names]


def test_lanes_run_notebooks_side_by_side_with_a_thread_cap_and_restore_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv("PEFTKIT_QUICK", "0")
    monkeypatch.setenv("PEFTKIT_RUNS", str(tmp_path))
    together = threading.Barrier(2, timeout=30)  # broken unless two notebooks run at once
    seen = []

    def one(path):
        seen.append((path.name, os.environ[THREADS_ENV], os.environ["PEFTKIT_QUICK"]))
        if path.name in ("a", "b"):
            together.wait()

    each = L.in_lanes(one, _paths("a", "b", "c"), 2, quick=True)
    assert each == max(1, (os.cpu_count() or 1) // 2)
    assert sorted(n for n, _, _ in seen) == ["a", "b", "c"]
    assert {(t, q) for _, t, q in seen} == {(str(each), "1")}  # every kernel inherits the cap and quick mode
    assert THREADS_ENV not in os.environ and os.environ["PEFTKIT_QUICK"] == "0"  # as before the run


def test_a_failing_notebook_stops_the_lanes_taking_more_and_is_raised(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")  # a cap the caller set is kept
    ran = []

    def one(path):
        ran.append(path.name)
        assert os.environ[THREADS_ENV] == "3"
        if path.name == "bad":
            raise B.NotebookFailed("bad failed in cell 2 (ValueError: no)")

    with pytest.raises(B.NotebookFailed, match="bad failed in cell 2"):
        L.in_lanes(one, _paths("bad", *[f"n{i}" for i in range(20)]), 2, quick=True)
    assert "bad" in ran and len(ran) < 21
    assert os.environ[THREADS_ENV] == "3"


def test_longest_first_uses_the_last_timings_of_the_same_mode_else_the_measured_order(tmp_path):
    paths = _paths("01_a.ipynb", "06_b.ipynb", "10_c.ipynb", "11_d.ipynb")
    assert [p.name[:2] for p in L.longest_first(paths, quick=True, timings_under=tmp_path)] == ["10", "11", "01", "06"]
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "timings.json").write_text(json.dumps(
        {"quick": True, "notebooks": {"06_b.ipynb": 50.0, "11_d.ipynb": 90.0, "01_a.ipynb": 1.0, "10_c.ipynb": 80.0}}))
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "timings.json").write_text(json.dumps({"quick": False, "notebooks": {"01_a.ipynb": 999.0}}))
    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / "timings.json").write_text("{torn")  # skipped
    assert [p.name[:2] for p in L.longest_first(paths, quick=True, timings_under=tmp_path)] == ["11", "10", "06", "01"]
    (tmp_path / "run4").mkdir()  # a later warm run: the longest time each took still decides
    (tmp_path / "run4" / "timings.json").write_text(json.dumps(
        {"quick": True, "notebooks": {"06_b.ipynb": 2.0, "11_d.ipynb": 3.0, "01_a.ipynb": 9.0, "10_c.ipynb": 40.0}}))
    for i, run in enumerate(("run1", "run2", "run3", "run4")):  # written in this order
        os.utime(tmp_path / run / "timings.json", (1_000_000 + i, 1_000_000 + i))
    assert [p.name[:2] for p in L.longest_first(paths, quick=True, timings_under=tmp_path)] == ["11", "10", "06", "01"]
    assert [p.name[:2] for p in L.longest_first(paths, quick=True, timings_under=tmp_path, recent=1)] == ["10", "01", "11", "06"]


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True, "2"])
def test_jobs_must_be_a_positive_count(jobs):
    with pytest.raises(ValueError, match="jobs must be a positive number"):
        B.run_all(quick=True, only=["01"], jobs=jobs)


def test_the_cli_refuses_zero_jobs(capsys):
    from peftkit.cli import main
    with pytest.raises(SystemExit):
        main(["run", "--quick", "--jobs", "0"])
    assert "--jobs" in capsys.readouterr().err


def test_quick_runs_two_notebooks_at_once_where_there_are_two_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert L.default_jobs(quick=True) == 2 and L.default_jobs(quick=False) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert L.default_jobs(quick=True) == 1


def test_the_quick_banner_says_when_the_kernel_was_capped(monkeypatch):
    from peftkit.notebook.params import quick_banner
    monkeypatch.delenv(THREADS_ENV, raising=False)
    alone = quick_banner(True, {"snippets": 320}).data
    assert "snippets: 320" in alone and "PEFTKIT_THREADS" not in alone
    monkeypatch.setenv(THREADS_ENV, "1")
    beside = quick_banner(True, {"snippets": 320}).data
    assert "at most 1 torch thread (PEFTKIT_THREADS" in beside and "beside another notebook" in beside
    assert quick_banner(False, {"snippets": 320}) is None


def test_a_kernel_is_not_interrupted_on_its_way_to_shutting_down(monkeypatch):
    """jupyter_client sends SIGINT before every shutdown; papermill shuts kernels down idle, and the signal only
    printed "KeyboardInterrupt caught in kernel" into the run's output. Interrupts asked for otherwise still go."""
    import asyncio
    import shutil

    from jupyter_client.manager import AsyncKernelManager

    calls = []

    async def interrupt(self):
        calls.append(self.shutting_down)

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", interrupt)
    km = B._local_kernel_manager()()
    try:
        asyncio.run(km._async_interrupt_kernel())
        km.shutting_down = True
        asyncio.run(km._async_interrupt_kernel())
    finally:
        shutil.rmtree(km._socket_dir, ignore_errors=True)
    assert calls == [False]


def test_ctrl_c_stops_the_lanes_taking_more_notebooks(monkeypatch):
    import signal
    import time

    monkeypatch.delenv(THREADS_ENV, raising=False)
    ran, both = [], threading.Barrier(2, timeout=30)

    def one(path):
        ran.append(path.name)
        both.wait()  # a and b run side by side
        if path.name == "a":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, while the main thread waits for the lanes
        time.sleep(1.0)

    with pytest.raises(KeyboardInterrupt):
        L.in_lanes(one, _paths("a", "b", "c", "d"), 2, quick=True)
    time.sleep(2.0)  # a and b end after 1 s; without the stop, the lanes would take c and d then
    assert sorted(ran) == ["a", "b"] and THREADS_ENV not in os.environ
