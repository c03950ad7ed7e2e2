"""Every notebook runs unattended under papermill in quick mode, and is committed without outputs."""

import json
from pathlib import Path

import pytest

from peftkit.notebook.batch_run import NotebookFailed, execute, notebooks, run_all
from test_notebook_verdicts import STORY, check_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_follows_the_conventions(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{path.name} holds outputs: strip it (jupyter nbconvert --clear-output --inplace)"
    first = code[0]
    assert "parameters" in first["metadata"].get("tags", []), "the first code cell must be tagged parameters"
    src = "".join(first["source"])
    assert 'quick = os.environ.get("PEFTKIT_QUICK") == "1"' in src and "progress" in src
    assert all("#" in line for line in src.splitlines() if "=" in line), "each parameter carries a # comment"
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "## Summary" in text and "## Exercises" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_quick_mode(path, tmp_path):
    try:
        execute(path, tmp_path, quick=True)
    except NotebookFailed as e:  # names the notebook, the cell and the error
        pytest.fail(str(e))
    out = json.loads((tmp_path / path.name).read_text())
    errors = [o for c in out["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    if path in STORY:  # the same run's key results against their words (one execution serves both tests)
        check_notebook(tmp_path / path.name)


def test_bad_parameter_names_the_cell_and_the_error(tmp_path, capfd):
    path = next(p for p in NOTEBOOKS if p.name.startswith("02"))
    with pytest.raises(NotebookFailed, match=r"02_lora_training.ipynb failed in cell \d+ \(ParameterError: .*domain='reddit'"):
        execute(path, tmp_path, quick=True, parameters={"domain": "reddit"})
    assert (tmp_path / path.name).exists()  # the executed copy is kept for inspection
    # the kernel talks to papermill over Unix sockets: ipykernel's warning about unencrypted TCP is gone
    assert "without encryption" not in capfd.readouterr().err


def test_kernels_started_at_once_each_get_their_own_sockets(tmp_path):
    """Two notebooks run side by side (or `make run` beside `make test`) start kernels in the same folder. With
    jupyter_client's default ipc names (kernel-ipc-1, -2, ... in the working directory) they took the same
    sockets and one kernel never answered; each now has a private folder, removed when it shuts down."""
    import threading

    import nbformat
    import papermill as pm
    from peftkit.notebook.batch_run import _local_kernel_manager

    socket_dirs = []

    class Recorded(_local_kernel_manager()):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            socket_dirs.append(Path(self._socket_dir))

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os\nprint(os.getpid())")]
    nbformat.write(nb, tmp_path / "a.ipynb")
    failures = []

    def run(i):
        try:
            pm.execute_notebook(str(tmp_path / "a.ipynb"), str(tmp_path / f"out{i}.ipynb"), cwd=str(tmp_path),
                                kernel_name="python3", progress_bar=False, start_timeout=30,
                                kernel_manager_class=Recorded)
        except Exception as e:  # noqa: BLE001 - reported below, with the thread's number
            failures.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    pids = {"".join(json.loads((tmp_path / f"out{i}.ipynb").read_text())["cells"][0]["outputs"][0]["text"])
            for i in range(3)}
    assert len(pids) == 3  # three kernels, each answered
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ipynb", "out0.ipynb", "out1.ipynb", "out2.ipynb"]
    assert len(set(socket_dirs)) == 3 and not any(d.exists() for d in socket_dirs)  # private, and removed after


def test_runner_writes_report(tmp_path):
    index = run_all(quick=True, only=["02"], out=str(tmp_path))
    html = index.read_text()
    assert "02_lora_training.html" in html and (tmp_path / "02_lora_training.html").exists()
    assert json.loads((tmp_path / "timings.json").read_text())["quick"] is True
    with pytest.raises(ValueError, match="no notebook numbered"):
        notebooks(["99"])


def test_quick_suite_can_leave_the_solutions_out_and_puts_them_back_unrun(tmp_path):
    """`peftkit run --quick` leaves the exercises' solution cells out (this suite runs them, in the tests above);
    the executed copy still holds them, in place and without outputs, and its metadata says they did not run."""
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    params = nbformat.v4.new_code_cell("quick = False  # quick mode\nprogress = True  # bars")
    params.metadata["tags"] = ["parameters"]
    solution = nbformat.v4.new_code_cell("raise RuntimeError('the solution ran')")
    solution.metadata.update(tags=["solution"], jupyter={"source_hidden": True})
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"), solution, nbformat.v4.new_code_cell("print(x + 1)"),
                nbformat.v4.new_markdown_cell("## Exercises"), nbformat.v4.new_code_cell("print('end')")]
    nbformat.write(nb, tmp_path / "toy.ipynb")
    (tmp_path / "out").mkdir()
    out = nbformat.read(execute(tmp_path / "toy.ipynb", tmp_path / "out", quick=True, solutions=False), as_version=4)
    sources = [c.source for c in out.cells]
    assert sources.count(solution.source) == 1
    at = sources.index(solution.source)
    assert sources[at - 1] == "x = 1" and sources[at + 1] == "print(x + 1)"  # where it was
    back = out.cells[at]
    assert back.outputs == [] and back.execution_count is None and back.metadata["tags"] == ["solution"]
    assert "".join(out.cells[at + 1].outputs[0]["text"]) == "2\n"  # the cells after it ran
    assert out.metadata["peftkit"]["solutions_run"] is False
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["toy.ipynb"]  # the trimmed copy is gone
    with pytest.raises(NotebookFailed, match="RuntimeError: the solution ran"):  # by default the solution runs
        execute(tmp_path / "toy.ipynb", tmp_path / "out", quick=True)
