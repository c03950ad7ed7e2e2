"""Notebook 01 in a real browser: JupyterLab on 127.0.0.1, driven through Debian's Chromium.

What a unit test cannot see: that the notebook runs from JupyterLab's own "Run All Cells", that
the plotly chart and the ipywidgets slider actually render in the page, and that moving the
slider in the browser reaches the kernel and changes the counts shown. The browser is Debian's
/usr/bin/chromium driven by Playwright's Python API; Playwright's own browsers are never
downloaded. The server runs on a copy of the notebook (JupyterLab autosaves, and the committed
file must stay stripped) with a fresh HOME and settings, so no workspace state leaks in or out.
A screenshot goes to runs/browser_01_principles.png.
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
NOTEBOOK = "01_principles.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "runs" / "browser_01_principles.png"
RUN_ALL_TIMEOUT_S = 150  # quick mode takes well under a minute alone; the machine may be busy


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
    errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
    stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    found = errors.all_inner_texts()
    found += [t for t in stderr.all_inner_texts() if "Traceback" in t]
    return found


def run_all_cells(page, attempts: int = 2) -> None:
    """Run > Run All Cells, then check that the run started: right after the kernel connects,
    the menu can act on no notebook (it is not yet the current widget), so retry once."""
    for attempt in range(1, attempts + 1):
        # Activating the notebook's tab makes it the widget that the Run menu acts on.
        page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=NOTEBOOK).click()
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


def test_notebook_01_runs_in_jupyterlab_and_the_slider_updates_the_counts(tmp_path):
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, nb_dir / NOTEBOOK)
    cells = json.loads((nb_dir / NOTEBOOK).read_text())["cells"]
    # Solution cells have their source hidden (collapsed until a reader opens them): JupyterLab draws
    # no input prompt for them, so count the code cells whose input is shown.
    n_code = sum(c["cell_type"] == "code" and not c.get("metadata", {}).get("jupyter", {}).get("source_hidden")
                 for c in cells)
    token = os.urandom(16).hex()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)

    with jupyter_lab(nb_dir, tmp_path / "home", token) as (url, server_log), sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile: Playwright's user-data-dir
            executable_path=chromium, headless=True, viewport={"width": 1400, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(30_000)
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}", timeout=90_000)
            page.locator(".jp-NotebookPanel .jp-CodeCell").first.wait_for(timeout=90_000)
            # The kernel must be up before Run All, or the run races its start-up.
            wait_until(lambda: "Idle" in page.locator("#jp-main-statusbar").inner_text(), 90,
                       "the kernel to report Idle in the status bar")
            # Cells are attached to the DOM progressively after the notebook opens.
            wait_until(lambda: len(prompts(page)) == n_code, 60, f"all {n_code} code cells in the DOM")

            run_all_cells(page)

            def finished():
                ps = prompts(page)
                busy = page.locator('.jp-Notebook-ExecutionIndicator[data-status="busy"]').count()
                return not busy and len(ps) == n_code and all(re.fullmatch(r"\[\d+\]:", t) for t in ps)
            try:
                wait_until(finished, RUN_ALL_TIMEOUT_S, "every cell to run (prompts [n]:, kernel idle)")
            except AssertionError:
                page.screenshot(path=str(SCREENSHOT))
                raise AssertionError(f"run all did not finish; prompts {prompts(page)}; errors "
                                     f"{error_outputs(page)}\nserver log:\n{server_log()}") from None
            run_s = time.monotonic() - started
            assert not error_outputs(page), f"cells failed:\n{error_outputs(page)}"

            plot = page.locator(".js-plotly-plot").first
            plot.wait_for(timeout=30_000)
            assert plot.locator(".main-svg").count() > 0, "plotly figure has no SVG"

            text = page.locator(".peftkit-calc-text")
            text.wait_for(timeout=30_000)
            before = text.inner_text()
            readout = page.locator(".peftkit-calc-r .widget-readout")
            r_before = readout.inner_text().strip()
            handle = page.locator(".peftkit-calc-r .noUi-handle")
            handle.scroll_into_view_if_needed()
            handle.focus()
            for _ in range(4):  # noUiSlider moves one step per arrow key, firing its slide event
                handle.press("ArrowRight")
            target = int(r_before) + 4
            assert readout.inner_text().strip() == str(target)
            # Each key press is a round trip to the kernel's observer: wait for the last one.
            wait_until(lambda: f"LoRA, r = {target}:" in text.inner_text(), 20,
                       f"the counts text to show r = {target} after moving the r slider")
            after = text.inner_text()
            assert after != before
            assert f"{target * (384 + 384):,}" in after  # r (in + out) at MiniLM's 384 x 384

            # Frame the chart and the calculator in one picture for a person to look at.
            page.set_viewport_size({"width": 1400, "height": 2600})
            page.evaluate("""() => {
                const plot = document.querySelector('.js-plotly-plot');
                plot.scrollIntoView({block: 'start'});
            }""")
            page.wait_for_timeout(500)
            page.screenshot(path=str(SCREENSHOT))
        finally:
            ctx.close()
    total_s = time.monotonic() - started
    print(f"run all: {run_s:.0f} s; whole test: {total_s:.0f} s; screenshot: {SCREENSHOT}")
