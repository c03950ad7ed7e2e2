"""Several notebooks at once: `peftkit run --jobs N` (the default for --quick on two or more cores).

Each lane is a thread that takes the next notebook when it is free, the longest first; every kernel inherits
PEFTKIT_THREADS = cores // N, so two notebooks on two cores each train on one thread. On these small matrices
two one-thread kernels get more done than one two-thread kernel (the quick suite cold: 418 s one at a time,
295 s two at a time, on a 2-core AMD EPYC). Two notebooks that need the same cached run train it once:
`studies.experiments.compare` locks each run's key.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

from ..runtime import THREADS_ENV, thread_cap
from ..storage import RUNS_ENV, runs_dir

ROOT = Path(__file__).resolve().parents[2]  # the repository: peftkit/<layer>/<module>.py


def default_jobs(quick: bool) -> int:
    """Notebooks run at once by default: two in quick mode where there are two cores (a one-thread kernel beside
    another gets more done than one kernel on both cores: the quick suite cold on 2 cores, 418 s one at a time,
    295 s two at a time, measured the same morning), one in full mode, whose timings are results."""
    return min(2, os.cpu_count() or 1) if quick else 1


# The quick suite's notebooks, longest first, as measured cold on 2 cores (docs/results.md, "The quick suite"):
# the order `longest_first` falls back on before this machine has timings of its own.
LONGEST_FIRST = ("10", "11", "04", "05", "08", "03", "02", "07", "01", "09", "06")


def longest_first(paths: list[Path], quick: bool, timings_under: Path | None = None, recent: int = 5) -> list[Path]:
    """`paths`, the longest first: by the longest each took in the last `recent` batch runs of the same mode
    (runs/*/timings.json, or under `timings_under`), else in LONGEST_FIRST's order. The longest, not the latest:
    a run that trains (cold) decides the order, not one that found every run cached. Longest first keeps the
    lanes even at the end."""
    found = []
    for f in Path(timings_under or ROOT / "runs").glob("*/timings.json"):
        try:
            t = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(t, dict) and t.get("quick") == quick and isinstance(t.get("notebooks"), dict):
            found.append((f.stat().st_mtime, t["notebooks"]))
    longest: dict[str, float] = {}
    for _, times in sorted(found, key=lambda x: x[0])[-recent:]:
        for k, v in times.items():
            if isinstance(v, (int, float)):
                longest[k] = max(longest.get(k, 0.0), float(v))
    rank = {n: i for i, n in enumerate(LONGEST_FIRST)}
    return sorted(paths, key=lambda p: (-longest.get(p.name, -1.0), rank.get(p.name[:2], len(rank))))


def in_lanes(one, paths: list[Path], jobs: int, quick: bool) -> int:
    """Run `one(path)` over `paths` in `jobs` threads, each taking the next notebook when it is free; the first
    failure stops the lanes from taking more, and is raised once the running notebooks end. Returns the torch
    threads each kernel had."""
    todo: queue.Queue = queue.Queue()
    for p in paths:
        todo.put(p)
    failures: list[BaseException] = []
    # Set once for the whole run, before any kernel starts: every notebook's kernel inherits the same values (and
    # execute() saves and restores the same ones), so the lanes never race on the environment.
    saved = {k: os.environ.get(k) for k in ("PEFTKIT_QUICK", RUNS_ENV, THREADS_ENV)}
    os.environ["PEFTKIT_QUICK"] = "1" if quick else "0"
    os.environ[RUNS_ENV] = str(runs_dir().resolve())
    if not saved[THREADS_ENV]:
        os.environ[THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // jobs))
    each = thread_cap()

    def lane() -> None:
        while not failures:
            try:
                path = todo.get_nowait()
            except queue.Empty:
                return
            try:
                one(path)
            except BaseException as e:  # noqa: BLE001 - raised below, in the caller's thread
                failures.append(e)

    try:
        threads = [threading.Thread(target=lane, name=f"lane-{i}") for i in range(jobs)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except KeyboardInterrupt:  # Ctrl-C: no lane takes another notebook; the ones running finish first
            failures.append(KeyboardInterrupt())
            raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if failures:
        raise failures[0]
    return each
