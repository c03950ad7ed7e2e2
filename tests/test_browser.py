"""Every notebook in a real browser: JupyterLab on 127.0.0.1, driven through Debian's Chromium.

What a unit test cannot see: that each notebook runs from JupyterLab's own "Run All Cells" in
quick mode, that no cell shows an error or anything on stderr (a warning, a traceback), that its
plotly charts and ipywidgets render, and that moving a widget in the browser reaches the kernel
and changes the page. The test knows nothing of a notebook's cells: it iterates
notebooks/[0-9][0-9]_*.ipynb, and in a notebook with controls it moves the first one (a slider,
a dropdown) and waits for the outputs around it to change. The browser is Debian's
/usr/bin/chromium driven by Playwright's Python API; Playwright's own browsers are never
downloaded. One JupyterLab server and one browser serve every notebook; the server runs on copies
(JupyterLab autosaves, and the committed files must stay stripped) with a fresh HOME and settings.

Why Run All in the browser and not papermill first: the issue asks for the notebooks to run in the
page as a reader runs them, and quick mode keeps the whole suite to a few minutes. Each notebook is
bounded (RUN_ALL_TIMEOUT_S); `PEFTKIT_BROWSER_NOTEBOOKS=01,06` picks some. In `make test` this pass runs
last, after the papermill pass has trained and cached the quick runs (tests/conftest.py says why).
A screenshot of each goes to runs/browser/<notebook>.png, and the `make run` report links them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "runs" / "browser"
RUN_ALL_TIMEOUT_S = 600  # per notebook: quick mode takes about a minute alone; a busy machine takes five times that
_only = {o.strip().zfill(2) for o in os.environ.get("PEFTKIT_BROWSER_NOTEBOOKS", "").split(",") if o.strip()}
NOTEBOOKS = [p.name for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
             if not _only or p.name[:2] in _only]


def chromium_or_skip() -> str:
    """Path of Debian's Chromium; installs it once with apt when missing, else skips."""
    if not CHROMIUM.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        print("chromium missing: trying `apt-get install -y chromium chromium-driver` once")
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    if not CHROMIUM.exists():
        reason = ("no /usr/bin/chromium and apt-get could not install it: install the Debian "
                  "packages chromium and chromium-driver to run the browser test")
        print(reason)
        pytest.skip(reason)
    pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright` "
                        "(the Python package only; the browser is Debian's chromium)")
    return str(CHROMIUM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def fresh_jupyter_env(home: Path) -> dict:
    """Environment for the server: quick mode and private config, settings and workspaces."""
    dirs = {"JUPYTER_CONFIG_DIR": home / "config", "JUPYTER_RUNTIME_DIR": home / "runtime",
            "JUPYTERLAB_SETTINGS_DIR": home / "lab-settings",
            "JUPYTERLAB_WORKSPACES_DIR": home / "lab-workspaces", "IPYTHONDIR": home / "ipython"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    settings = dirs["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab"
    # Render every cell: with windowing JupyterLab drops off-screen cells from the DOM, and the
    # test would miss their prompts and errors.
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    # No news or update toasts: they need the network and can cover the page.
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}}
    env.update(HOME=str(home), PEFTKIT_QUICK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # The repository's result cache, as `make test`'s notebook pass and `make run` use: the quick runs
    # trained here are the ones the papermill pass (tests/test_notebooks.py) reuses, and the other way round.
    env.setdefault("PEFTKIT_RUNS", str(ROOT / "runs"))
    env.pop("JUPYTER_PATH", None)
    return env


@contextlib.contextmanager
def server(cmd: list, cwd: Path, env: dict, log_path: Path, ready_url: str, what: str,
           start_timeout: float = 90, before_stop=None):
    """Start a local server in a session of its own, wait until `ready_url` answers, yield a
    log-tail function; always stop it (after `before_stop()`) with its whole process group."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail() -> str:
        log.flush()
        return "".join(log_path.read_text().splitlines(True)[-30:])

    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_tail()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(ready_url, timeout=5).close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {start_timeout} s:\n{log_tail()}")
            time.sleep(0.5)
        yield log_tail
    finally:
        if before_stop is not None:
            with contextlib.suppress(Exception):
                before_stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@contextlib.contextmanager
def jupyter_lab(root_dir: Path, home: Path, token: str, start_timeout: float = 90):
    """Start JupyterLab on 127.0.0.1 and yield its base URL; always stop it and its kernels."""
    port = free_port()
    env = fresh_jupyter_env(home)  # creates home
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    url = f"http://127.0.0.1:{port}"

    def shut_kernels():  # kernels run in sessions of their own: stop them through the API first
        for k in _get(f"{url}/api/kernels?token={token}"):
            req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
            urllib.request.urlopen(req, timeout=10).close()

    with server(cmd, root_dir, env, home / "jupyter.log", f"{url}/api/status?token={token}", "jupyter lab",
                start_timeout, before_stop=shut_kernels) as log_tail:
        yield url, log_tail


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def prompts(page) -> list[str]:
    """The input prompts of all code cells: "[3]:" once run, "[*]:" while queued or running."""
    return [t.strip() for t in page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()]


def error_outputs(page) -> list[str]:
    """Every error and every stderr output shown on the page (warnings included: a reader sees them)."""
    errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
    stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    return errors.all_inner_texts() + [t for t in stderr.all_inner_texts() if t.strip()]


def launch(p, chromium: str, profile: Path, width: int = 1400, height: int = 1000):
    """Debian's Chromium, headless, with a fresh profile and no network side traffic."""
    return p.chromium.launch_persistent_context(
        str(profile), executable_path=chromium, headless=True, viewport={"width": width, "height": height},
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"])


def run_all_cells(page, notebook: str, attempts: int = 2) -> None:
    """Run > Run All Cells, then check that the run started: right after the kernel connects,
    the menu can act on no notebook (it is not yet the current widget), so retry once."""
    for attempt in range(1, attempts + 1):
        # Activating the notebook's tab makes it the widget that the Run menu acts on.
        page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=notebook).click()
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$"))
        page.locator(".lm-Menu-item:not(.lm-mod-disabled)", has=label).click()
        try:
            wait_until(lambda: any(t != "[ ]:" for t in prompts(page)), 20, "Run All Cells to start")
            return
        except AssertionError:
            if attempt == attempts:
                raise
            print(f"Run All Cells did not start (attempt {attempt}); retrying")
            page.keyboard.press("Escape")  # close the menu if it is still open


def shown_code_cells(path: Path) -> int:
    """Code cells whose input JupyterLab draws: a solution cell with its source hidden has no prompt."""
    cells = json.loads(path.read_text())["cells"]
    return sum(c["cell_type"] == "code" and not c.get("metadata", {}).get("jupyter", {}).get("source_hidden")
               for c in cells)


# The first control of a notebook's widgets: (CSS selector, how to move it). Progress bars are not controls.
CONTROLS = [(".widget-slider .noUi-handle", "slider"), (".widget-dropdown select", "dropdown"),
            (".widget-toggle-buttons button:not(.mod-active)", "click"), (".widget-checkbox input", "click")]

# The outputs around a control, with the control's own echo (readout, select box, track) removed:
# what must change when the kernel's observer answers.
AROUND = """(el) => {
    const area = el.closest('.jp-Cell-outputArea') || el.closest('.jp-OutputArea');
    const copy = area.cloneNode(true);
    copy.querySelectorAll('.widget-readout, select, .noUi-target, .widget-slider').forEach(n => n.remove());
    return copy.innerText + '|' + copy.querySelectorAll('path, rect, text').length + '|' + copy.innerHTML.length;
}"""


def move_first_control(page) -> str | None:
    """Move the first control in the page; return what was moved, or None when there is none."""
    for selector, how in CONTROLS:
        found = page.locator(f".jp-OutputArea {selector}")
        if found.count() == 0:
            continue
        control = found.first
        control.scroll_into_view_if_needed()
        before = control.evaluate(AROUND)
        if how == "slider":
            control.focus()
            key = "ArrowLeft" if control.get_attribute("aria-valuenow") == control.get_attribute("aria-valuemax") else "ArrowRight"
            for _ in range(3):  # noUiSlider moves one step per key press, firing its slide event
                control.press(key)
            control.press("Enter")
        elif how == "dropdown":
            options = control.locator("option").all_inner_texts()
            current = control.evaluate("s => s.options[s.selectedIndex].text")
            other = next((o for o in options if o != current), None)
            if other is None:
                continue
            control.select_option(label=other)
        else:
            control.click()
        wait_until(lambda: control.evaluate(AROUND) != before, 60,
                   f"the page to change after moving a {how} ({selector})")
        return f"{how} {selector}"
    return None


@pytest.fixture(scope="session")
def lab(tmp_path_factory, pw):
    """One JupyterLab (on copies of the notebooks) and one Chromium for every notebook (of this worker: under
    `make test`'s two workers, a worker runs a notebook's papermill test and then this one, so the fixture
    outlives the switches between the two modules)."""
    chromium = chromium_or_skip()
    tmp = tmp_path_factory.mktemp("browser")
    nb_dir = tmp / "notebooks"
    nb_dir.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / name, nb_dir / name)
    token = os.urandom(16).hex()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with jupyter_lab(nb_dir, tmp / "home", token) as (url, server_log):
        ctx = launch(pw, chromium, tmp / "chromium-profile")
        try:
            yield {"ctx": ctx, "url": url, "token": token, "log": server_log, "dir": nb_dir}
        finally:
            ctx.close()


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab_clean_and_its_widgets_answer(lab, notebook):
    started = time.monotonic()
    n_code = shown_code_cells(lab["dir"] / notebook)
    shot = SHOTS / f"{Path(notebook).stem}.png"
    page = lab["ctx"].new_page()
    page.set_default_timeout(30_000)
    try:
        # a workspace of its own: the page opens this notebook alone, not the tabs of the one before
        page.goto(f"{lab['url']}/lab/workspaces/nb{notebook[:2]}/tree/{notebook}?token={lab['token']}", timeout=90_000)
        page.locator(".jp-NotebookPanel .jp-CodeCell").first.wait_for(timeout=90_000)
        # The kernel must be up before Run All, or the run races its start-up.
        wait_until(lambda: "Idle" in page.locator("#jp-main-statusbar").inner_text(), 90,
                   "the kernel to report Idle in the status bar")
        # Cells are attached to the DOM progressively after the notebook opens.
        wait_until(lambda: len(prompts(page)) == n_code, 60, f"all {n_code} code cells in the DOM")

        run_all_cells(page, notebook)

        def finished():
            ps = prompts(page)
            busy = page.locator('.jp-Notebook-ExecutionIndicator[data-status="busy"]').count()
            return (not busy and len(ps) == n_code and all(re.fullmatch(r"\[\d+\]:", t) for t in ps)) or error_outputs(page)
        try:
            wait_until(finished, RUN_ALL_TIMEOUT_S, "every cell to run (prompts [n]:, kernel idle)")
        except AssertionError:
            page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"{notebook}: run all did not finish; prompts {prompts(page)}; errors "
                                 f"{error_outputs(page)}\nserver log:\n{lab['log']()}") from None
        run_s = time.monotonic() - started
        shown = error_outputs(page)
        if shown:
            page.screenshot(path=str(shot), full_page=True)
        assert not shown, f"{notebook} shows errors or stderr output:\n" + "\n---\n".join(t[:2000] for t in shown)

        plots = page.locator(".js-plotly-plot")
        for i in range(plots.count()):
            assert plots.nth(i).locator(".main-svg").count() > 0, f"{notebook}: plotly figure {i} has no SVG"
        moved = move_first_control(page)
        controls = page.locator(".jp-OutputArea .widget-slider, .jp-OutputArea .widget-dropdown").count()
        assert moved or not controls, f"{notebook} shows {controls} widgets but none could be moved"
        # A tall page framed on the first control (else the first figure) for a person to look at,
        # with the file browser folded away.
        with contextlib.suppress(Exception):
            page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click(timeout=5_000)
        page.set_viewport_size({"width": 1400, "height": 2400})
        page.evaluate("""() => {
            const el = document.querySelector('.jp-OutputArea .widget-slider, .jp-OutputArea .widget-dropdown')
                       || document.querySelector('.js-plotly-plot');
            if (el) el.scrollIntoView({block: 'start'});
        }""")
        page.wait_for_timeout(500)
        page.screenshot(path=str(shot))
        print(f"{notebook}: run all {run_s:.0f} s; moved: {moved}; screenshot {shot}")
    finally:
        page.close()
        # free the kernel's memory before the next notebook (kernels outlive their page)
        with contextlib.suppress(Exception):
            for k in _get(f"{lab['url']}/api/kernels?token={lab['token']}"):
                req = urllib.request.Request(f"{lab['url']}/api/kernels/{k['id']}?token={lab['token']}", method="DELETE")
                urllib.request.urlopen(req, timeout=10).close()
