"""The batch runner: every notebook through papermill, exported to HTML, and one report page.

`python -m peftkit run` executes notebooks/NN_*.ipynb in order into runs/<timestamp>/, with
their default parameters (or quick ones), converts each to HTML and writes index.html with the
summary table from the result cache, the key figures and links to each notebook. A failing
notebook stops the run with the failing cell's error; its executed copy is kept to inspect.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat

from ..storage import RUNS_ENV, runs_dir
from ..studies.experiments import DEFAULT_CACHE, read_cache, results_frame
from .params import RECORD_MIME
from .plots import pareto_figure
from . import warm_kernel
from .lanes import default_jobs, in_lanes, longest_first

ROOT = Path(__file__).resolve().parents[2]  # the repository: peftkit/<layer>/<module>.py
NOTEBOOKS = ROOT / "notebooks"
SCREENSHOTS = ROOT / "runs" / "browser"  # written by tests/test_browser.py and tests/test_dashboard.py


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


def notebooks(only: list[str] | None = None) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.strip().zfill(2) for o in only}
        unknown = wanted - {p.name[:2] for p in found}
        if unknown:
            raise ValueError(f"no notebook numbered {sorted(unknown)}; there are {[p.name[:2] for p in found]}.")
        found = [p for p in found if p.name[:2] in wanted]
    return found


def declared_parameters(path: Path) -> dict:
    """The names and default source of the `parameters` cell (for validating -p overrides)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+)\s*=\s*(.+?)(?:\s+#.*)?$", cell.source, re.M)}
    return {}


def _failing_cell(nb_path: Path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {i} ({out.get('ename')}: {out.get('evalue')})"
    return "an unknown cell"


def _local_kernel_manager():
    """A kernel manager that talks to its kernel over Unix sockets (ZeroMQ's ipc transport) instead of TCP
    on 127.0.0.1: the kernel is on this machine, the sockets' files are private to this user, and ipykernel
    no longer warns on stderr, once per notebook, that its TCP ports are unencrypted.

    Each kernel's socket files live in a private folder of their own. jupyter_client's default puts them in
    the working directory as kernel-ipc-1, -2, ..., numbered by which names are free, so two kernels starting
    at once in notebooks/ (two notebooks run side by side, or `make run` beside `make test`) took the same
    names and one never answered."""
    import tempfile

    from jupyter_client.manager import AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            if kwargs["transport"] == "ipc" and "ip" not in kwargs:
                self._socket_dir = tempfile.mkdtemp(prefix="peftkit-kernel-")  # mode 0700
                kwargs["ip"] = os.path.join(self._socket_dir, "ipc")
            super().__init__(**kwargs)

        def format_kernel_cmd(self, extra_arguments=None):
            """Python's own kernel is forked from a warm zygote (`warm_kernel`), any other starts as specified."""
            cmd = super().format_kernel_cmd(extra_arguments)
            if cmd[1:3] != ["-m", "ipykernel_launcher"] or os.path.realpath(cmd[0]) != os.path.realpath(sys.executable):
                return cmd
            zygote = warm_kernel.zygote()
            return cmd if zygote is None else zygote.kernel_cmd(cmd[3:])

        async def _async_interrupt_kernel(self) -> None:
            # jupyter_client interrupts a kernel before it asks it to shut down. papermill shuts a kernel down when
            # its last cell has ended, idle, and the SIGINT only had ipykernel print "KeyboardInterrupt caught in
            # kernel" to the run's terminal (two notebooks at a time: most of them). A kernel still busy gets the
            # shutdown request, then SIGTERM, then SIGKILL, as before; an interrupt asked for at any other time
            # goes through.
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart and getattr(self, "_socket_dir", None):
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    return LocalKernelManager


SOLUTION_TAG = "solution"  # the exercises' solution cells, hidden in JupyterLab (tests/test_notebook_verdicts.py)


def without_solutions(path: Path, dest: Path) -> list[tuple[str | None, dict]]:
    """Write `path` to `dest` without its solution cells; return them, each with the id of the cell before it."""
    nb = nbformat.read(path, as_version=4)
    kept, removed, before = [], [], None
    for cell in nb.cells:
        if cell.cell_type == "code" and SOLUTION_TAG in cell.metadata.get("tags", []):
            removed.append((before, cell))
        else:
            kept.append(cell)
            before = cell.get("id")
    nb.cells = kept
    nbformat.write(nb, dest)
    return removed


def restore_solutions(out: Path, removed: list[tuple[str | None, dict]]) -> None:
    """Put the solution cells back into the executed notebook, unexecuted, where they were, and say so in its metadata."""
    nb = nbformat.read(out, as_version=4)
    for before, cell in removed:  # in order: each goes after its predecessor, or after the solutions put back before it
        at = next((i + 1 for i, c in enumerate(nb.cells) if c.get("id") == before), 0)
        while at < len(nb.cells) and nb.cells[at].get("id") in {c.get("id") for _, c in removed}:
            at += 1
        cell.outputs, cell.execution_count = [], None
        nb.cells.insert(at, cell)
    nb.metadata.setdefault("peftkit", {})["solutions_run"] = False
    nbformat.write(nb, out)


def execute(path: Path, out_dir: Path, quick: bool, parameters: dict | None = None, timeout: int = 3600,
            solutions: bool = True, save_each_cell: bool = False) -> Path:
    """Run one notebook with papermill into out_dir; raise NotebookFailed with the cell's error.

    solutions=False leaves the exercises' solution cells out of the run (they stay in the executed copy, with
    no outputs): the quick suite's default, since the test suite runs every solution in quick mode.
    save_each_cell=True has papermill rewrite the executed copy as each cell starts and ends (its default), to
    watch a long run's progress in the file; by default the copy is written once, when the run ends or fails."""
    import papermill as pm  # heavy (it loads nbclient and a kernel manager): only batch runs need it
    params = {"quick": quick, "progress": False, **(parameters or {})}
    declared = declared_parameters(path)
    params = {k: v for k, v in params.items() if k in declared}
    out = out_dir / path.name
    source, removed = path, []
    if not solutions:
        source = out_dir / f".{path.stem}.no-solutions.ipynb"
        removed = without_solutions(path, source)
    env_quick, env_runs = os.environ.get("PEFTKIT_QUICK"), os.environ.get(RUNS_ENV)
    os.environ["PEFTKIT_QUICK"] = "1" if quick else "0"
    # the kernel runs in notebooks/: point its result cache and Optuna storage at the caller's runs/
    os.environ[RUNS_ENV] = str(runs_dir().resolve())
    # papermill infers parameter types by parsing the cell and warns about every line it cannot
    # (`quick = os.environ.get(...)`), then calls those names unknown: noise here, because the
    # names were checked against the cell above. Its errors still show.
    pm_log = logging.getLogger("papermill")
    pm_level = pm_log.level
    pm_log.setLevel(logging.ERROR)
    try:
        pm.execute_notebook(str(source), str(out), parameters=params, cwd=str(path.parent), kernel_name="python3",
                            progress_bar=False, execution_timeout=timeout, log_output=False,
                            request_save_on_cell_execute=save_each_cell, kernel_manager_class=_local_kernel_manager())
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(f"{path.name} failed in cell {e.exec_count} ({e.ename}: {e.evalue}); "
                             f"the executed copy is kept at {out}.") from None
    except Exception as e:
        if out.exists():
            raise NotebookFailed(f"{path.name} failed in {_failing_cell(out)}: {e}; the executed copy is at {out}.") from None
        raise
    finally:
        if source != path:
            source.unlink(missing_ok=True)
        pm_log.setLevel(pm_level)
        for name, value in (("PEFTKIT_QUICK", env_quick), (RUNS_ENV, env_runs)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if removed:
        restore_solutions(out, removed)
    keep_records(out)  # the key results, also in the executed notebook's metadata
    return out


def records(nb_path: Path) -> list[dict]:
    """The key results a notebook recorded with `params.record`, in the order its cells ran."""
    nb = nbformat.read(nb_path, as_version=4)
    return [out["data"][RECORD_MIME] for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if RECORD_MIME in out.get("data", {})]


def keep_records(nb_path: Path) -> list[dict]:
    """Copy the records into the executed notebook's metadata (`metadata.peftkit.records`)."""
    found = records(nb_path)
    nb = nbformat.read(nb_path, as_version=4)
    nb.metadata.setdefault("peftkit", {})["records"] = found
    nbformat.write(nb, nb_path)
    return found


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_shown(v)}" for k, v in value.items())
    return str(value)


def to_html(nb_path: Path) -> Path:
    """The executed notebook as HTML, without its record outputs: index.html lists those, and nbconvert,
    which has no way to draw their mimetype, warned once for each (stderr noise in every `make run`)."""
    from nbconvert import HTMLExporter  # heavy (jinja templates, mistune): only the report needs it
    nb = nbformat.read(nb_path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if RECORD_MIME not in o.get("data", {})]
    body, _ = HTMLExporter().from_notebook_node(nb)
    out = nb_path.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def write_report(out_dir: Path, timings: list[tuple[str, float]], cache=None, kept: dict | None = None,
                 solutions: bool = True, jobs: int = 1, lane_threads: int | None = None) -> Path:
    """index.html: timings, each notebook's recorded key results, the summary table from the result
    cache, key figures, links."""

    rows = list(read_cache(cache or DEFAULT_CACHE).values())
    parts = [f"<h1>peftkit run {html.escape(out_dir.name)}</h1>",
             "<h2>Notebooks</h2><table><tr><th>notebook</th><th>seconds</th></tr>"]
    for name, secs in timings:
        stem = Path(name).stem
        parts.append(f'<tr><td><a href="{stem}.html">{html.escape(stem)}</a> '
                     f'(<a href="{stem}.ipynb">ipynb</a>)</td><td>{secs:.0f}</td></tr>')
    parts.append("</table>")
    if jobs > 1:
        parts.append(f"<p>{jobs} notebooks ran at once, each kernel on {lane_threads or 'its share of the'} "
                     "torch thread(s): the seconds above, and the timings and step times inside the notebooks, were taken "
                     "beside another notebook's work, so they are noisier than a run of one at a time "
                     "(<code>--jobs 1</code>).</p>")
    if not solutions:
        parts.append("<p>The exercises' solution cells were not run (the quick suite leaves them out; the test suite "
                     "runs each of them in quick mode). <code>python -m peftkit run --quick --solutions</code> runs "
                     "them too.</p>")
    if kept:
        parts.append("<h2>Key results, as each notebook recorded them</h2><table><tr><th>notebook</th><th>result</th>"
                     "<th>value</th><th>verdict</th><th>interval</th></tr>")
        for name, found in kept.items():
            for r in found:
                iv = f"[{r['lo']:.4g}, {r['hi']:.4g}]" if isinstance(r.get("lo"), float) and isinstance(r.get("hi"), float) else ""
                parts.append(f"<tr><td>{html.escape(Path(name).stem)}</td><td>{html.escape(r['name'])}</td>"
                             f"<td>{html.escape(_shown(r['value']))}</td><td>{html.escape(str(r.get('verdict', '')))}</td>"
                             f"<td>{iv}</td></tr>")
        parts.append("</table>")
    if rows:
        df = results_frame(rows)
        cols = ["label", "base", "domain", "n_train", "epochs", "lr", "accuracy", "f1_macro", "trainable_pct",
                "sec_per_step", "peak_mem_mib", "adapter_bytes"]
        df = df[[c for c in cols if c in df]]
        parts.append(f"<h2>Results in the cache ({len(df)} runs)</h2>")
        parts.append(df.round(4).to_html(index=False, border=0))
        main = df[(df.get("base") == "minilm") & (df.get("domain") == "movies")] if "base" in df else df
        if len(main) >= 2:
            full = results_frame(r for r in rows if r.get("base") == "minilm" and r.get("domain") == "movies")
            parts.append("<h2>Accuracy against trainable parameters (MiniLM, movies)</h2>")
            parts.append(pareto_figure(full).to_html(full_html=False, include_plotlyjs=True))
    else:
        parts.append("<p>The result cache is empty.</p>")
    parts.append(screenshots_html(out_dir))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>peftkit report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def screenshots_html(out_dir: Path, shots: Path | None = None) -> str:
    """The browser tests' screenshots (each notebook in JupyterLab, the dashboard in Voila), copied
    next to the report and linked with the time each was taken; a note when there are none."""
    shots = SCREENSHOTS if shots is None else shots
    found = sorted(shots.glob("*.png")) if shots.is_dir() else []
    if not found:
        return ("<h2>Browser screenshots</h2><p>None yet: <code>pytest tests/test_browser.py "
                "tests/test_dashboard.py</code> takes them.</p>")
    (out_dir / "browser").mkdir(exist_ok=True)
    items = []
    for png in found:
        shutil.copy2(png, out_dir / "browser" / png.name)
        taken = datetime.fromtimestamp(png.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        items.append(f'<li><a href="browser/{html.escape(png.name)}">{html.escape(png.stem)}</a> (taken {taken})</li>')
    return "<h2>Browser screenshots</h2><ul>" + "".join(items) + "</ul>"


def run_all(quick: bool = False, only: list[str] | None = None, out: str | None = None,
            parameters: dict | None = None, solutions: bool | None = None, jobs: int | None = None) -> Path:
    """Execute the notebooks and write the report. solutions: run the exercises' solution cells; None runs them in
    full mode and leaves them out in quick mode (the test suite runs them, quick).

    jobs: notebooks run at once; None: `default_jobs(quick)`, two in quick mode, one in full. Above 1, each kernel
    gets cpu_count // jobs torch threads (PEFTKIT_THREADS), the longest notebooks (by the last runs' timings, else
    LONGEST_FIRST) start first, and two notebooks that need the same cached run train it once (`compare` locks each
    run's key). Timings and step times measured inside a notebook are then taken beside another notebook's work:
    noisier, as the report and each notebook's quick banner say."""
    jobs = default_jobs(quick) if jobs is None else jobs
    if not (isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1):
        raise ValueError(f"jobs must be a positive number of notebooks to run at once, got {jobs!r}.")
    paths = notebooks(only)
    solutions = (not quick) if solutions is None else bool(solutions)
    out_dir = Path(out) if out else ROOT / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = min(jobs, len(paths))
    kept, took, t_all = {}, {}, time.perf_counter()

    def one(path: Path) -> None:
        t0 = time.perf_counter()
        executed = execute(path, out_dir, quick, parameters, solutions=solutions)
        kept[path.name] = records(executed)
        to_html(executed)
        took[path.name] = time.perf_counter() - t0
        print(f"{path.name:32s} {took[path.name]:7.1f} s", flush=True)

    lane_threads = None
    if jobs == 1:
        for path in paths:
            one(path)
    else:
        lane_threads = in_lanes(one, longest_first(paths, quick, out_dir.parent), jobs, quick)
    timings = [(p.name, took[p.name]) for p in paths]  # the report keeps the notebooks' order
    (out_dir / "timings.json").write_text(json.dumps({"quick": quick, "solutions": solutions, "jobs": jobs,
                                                      "notebooks": dict(timings),
                                                      "total_seconds": time.perf_counter() - t_all}, indent=2))
    (out_dir / "records.json").write_text(json.dumps({p.name: kept[p.name] for p in paths}, indent=2))
    index = write_report(out_dir, timings, kept=kept, solutions=solutions, jobs=jobs, lane_threads=lane_threads)
    print(f"all {len(paths)} notebooks in {time.perf_counter() - t_all:.0f} s; report: {index}")
    return index
