"""The notebooks' verdicts follow from their numbers.

Each notebook keeps its key results with `params.record` (numbers, interval, and the word its prose
used). Run in quick mode, every recorded word must be the one its interval gives, and the prose the
notebook generated must use that word. The committed notebooks must not type a result into their
Markdown, and quick mode must train the real MiniLM, never the random tiny model.
"""

import json
import math
import re
import warnings
from pathlib import Path

import nbformat
import pytest

from peftkit.notebook import params, prose
from peftkit.notebook.batch_run import keep_records, records, to_html
from peftkit.studies import stats

ROOT = Path(__file__).resolve().parents[1]
STORY = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))  # every notebook keeps its key results
TYPED = re.compile(r"brought the accuracy back|twice as fast|beats the|outperforms|\bleads\b", re.I)


# --- the words, from numbers ----------------------------------------------------------------------

def test_direction_words_follow_the_interval():
    assert prose.direction_word(0.01, 0.2) == prose.BEATS
    assert prose.direction_word(-0.2, -0.01) == prose.TRAILS
    assert prose.direction_word(-0.01, 0.2) == prose.TIED
    assert prose.direction_word(math.nan, 0.2) == prose.TIED


def test_change_words():
    assert [prose.change_word(*iv) for iv in ((0.01, 0.1), (-0.1, -0.01), (-0.1, 0.1))] == \
        ["rose", "fell", "did not change beyond noise"]


def test_speed_words_have_a_tolerance():
    assert prose.speed_word(1.67) == prose.FASTER
    assert prose.speed_word(0.98) == prose.AS_FAST  # 05's int8 "about twice as fast" at 0.98x
    assert prose.speed_word(0.5) == prose.SLOWER
    assert prose.speed_word(math.nan) == prose.AS_FAST


def test_chance_word_uses_the_sample_size():
    assert prose.chance_word(0.725, 200) == "above chance"
    assert prose.chance_word(0.535, 200) == "not told apart from chance"
    assert prose.chance_word(0.535, 20_000) == "above chance"
    assert prose.chance_word(0.30, 200) == "below chance"


def test_proportion_difference_brackets_the_difference_and_narrows_with_n():
    d, lo, hi = prose.proportion_difference(635, 1000, 700, 1000)  # 07's "brought the accuracy back": it fell
    assert lo < d < hi and hi < 0 and prose.direction_word(lo, hi) == prose.TRAILS
    d2, lo2, hi2 = prose.proportion_difference(127, 200, 140, 200)
    assert math.isclose(d, d2) and lo2 < lo and hi2 > hi and prose.direction_word(lo2, hi2) == prose.TIED


def test_record_is_json_and_refuses_what_is_not(capsys):
    entry = params.record("x vs y", 0.25, lo=0.1, hi=0.4, verdict="beats")
    assert entry == {"name": "x vs y", "value": 0.25, "lo": 0.1, "hi": 0.4, "verdict": "beats"}
    assert params.record("nan becomes null", float("nan"))["value"] is None
    with pytest.raises(TypeError, match="record\\(\\) keeps numbers"):
        params.record("an object", object())
    with pytest.raises(ValueError, match="non-empty name"):
        params.record(" ", 1)


def test_records_survive_into_the_metadata(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("record(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data={params.RECORD_MIME: {"name": "a", "value": 1}}),
                    nbformat.v4.new_output("display_data", data={"text/plain": "1"})]
    nb.cells = [cell]
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert keep_records(path) == [{"name": "a", "value": 1}]
    assert json.loads(path.read_text())["metadata"]["peftkit"]["records"] == [{"name": "a", "value": 1}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nbconvert warns about a mimetype it cannot draw
        page = to_html(path).read_text()
    assert ">1<" in page or "1</pre>" in page  # the other output is drawn
    assert params.RECORD_MIME in path.read_text()  # the notebook keeps its record


# --- the committed notebooks ----------------------------------------------------------------------

@pytest.mark.parametrize("path", STORY, ids=lambda p: p.name)
def test_no_result_is_typed_and_quick_mode_uses_minilm(path):
    nb = json.loads(path.read_text())
    typed = [m.group(0) for c in nb["cells"] if c["cell_type"] == "markdown"
             for m in TYPED.finditer("".join(c["source"]))]
    assert not typed, f"{path.name} types a result into its Markdown: {typed}; generate it from the numbers"
    source = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert 'pick(base, quick, "tiny"' not in source and "quick_banner(quick" in source
    assert "nbutil.record(" in source, f"{path.name} records no key result"


@pytest.mark.parametrize("path", STORY, ids=lambda p: p.name)
def test_every_exercise_has_a_hidden_hint_and_solution(path):
    nb = json.loads(path.read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    asked = len(re.findall(r"^\d+\. ", text[text.index("## Exercises"):], re.M))
    hints = sum("<details><summary>Exercise" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    solutions = [c for c in nb["cells"] if c["cell_type"] == "code" and "solution" in c["metadata"].get("tags", [])]
    assert asked and hints == asked == len(solutions), (path.name, asked, hints, len(solutions))
    assert all(c["metadata"].get("jupyter", {}).get("source_hidden") for c in solutions)


# --- run in quick mode: records against intervals and prose ---------------------------------------

def _expected(r: dict) -> str | None:
    kind = r.get("kind")
    if kind == "direction":
        return prose.direction_word(r["lo"], r["hi"])
    if kind == "change":
        return prose.change_word(r["lo"], r["hi"])
    if kind == "stats.direction":
        return stats.direction(r["lo"], r["hi"])
    if kind == "chance":
        return prose.chance_word(r["value"], r["n"])
    if kind == "speed":
        return prose.speed_word(r["value"])
    return None


def check_notebook(path: Path) -> list[dict]:
    """The executed notebook's records agree with their intervals, and its generated prose says so."""
    found = records(path)
    assert found, f"{path.name} recorded no key result"
    nb = json.loads(path.read_text())
    assert nb["metadata"]["peftkit"]["records"] == found
    said = " ".join("".join(o["data"]["text/markdown"]) for c in nb["cells"] if c["cell_type"] == "code"
                    for o in c.get("outputs", []) if "text/markdown" in o.get("data", {}))
    shown = ["".join(o["data"]["text/plain"]) for c in nb["cells"] if c["cell_type"] == "code"
             for o in c.get("outputs", []) if "text/plain" in o.get("data", {})]
    assert not [t for t in shown if t.startswith("{'name': ")], f"{path.name} shows a record as text: end its cell otherwise"
    for r in found:
        want = _expected(r)
        if want is None:
            continue
        lo, hi = r.get("lo"), r.get("hi")
        if lo is not None and hi is not None:
            assert lo <= r["value"] <= hi, f"{path.name}: {r['name']} lies outside its own interval"
        assert r["verdict"] == want, f"{path.name}: {r['name']} says {r['verdict']!r}, its numbers say {want!r}"
        if r["kind"] in ("direction", "change", "chance", "speed"):
            assert want in said, f"{path.name}: the prose never says {want!r} for {r['name']}"
    for r in (r for r in found if r.get("kind") == "claim"):  # 11's verdicts: compound rules, so the word and its interval
        lo, hi = r.get("lo"), r.get("hi")
        if lo is not None and hi is not None:
            assert lo <= r["value"] <= hi, f"{path.name}: {r['name']} lies outside its own interval"
        assert r["verdict"] in said, f"{path.name}: the prose never says {r['verdict']!r} for {r['name']}"
    return found


# The quick runs themselves: tests/test_notebooks.py executes every notebook once and calls
# check_notebook on every executed copy.


@pytest.mark.parametrize("path", STORY, ids=lambda p: p.name)
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 wants an id per cell; without one it warns on every run, and later versions refuse."""
    cells = json.loads(path.read_text())["cells"]
    ids = [c.get("id") for c in cells]
    assert None not in ids and len(set(ids)) == len(ids), path.name


def test_a_notebooks_workdir_is_removed_when_its_kernel_exits(tmp_path):
    """The notebooks save adapters to `params.workdir`; a run must not leave them in /tmp."""
    import subprocess
    import sys
    code = ("import os, tempfile; tempfile.tempdir = os.environ['T']\n"
            "from peftkit.notebook.params import workdir\n"
            "p = workdir('peftkit-x-'); (p / 'a').write_text('1'); print(p)")
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "T": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).parent == tmp_path and not Path(out).exists()
