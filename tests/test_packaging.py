"""The project's set-up files agree with each other."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["dev"] + extras["federated"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    pip = [p for p in pip if not p.startswith("-e")]
    assert sorted(pip) == sorted(wanted), "environment.yml's pip list must equal pyproject's dependencies + dev + federated"
    assert {_name(p) for p in pip} == {_name(w) for w in wanted}


def test_torch_is_pinned_everywhere():
    for f in ("pyproject.toml", "environment.yml", "Makefile"):
        assert "torch==2.13.0" in (ROOT / f).read_text(), f


def test_ci_calls_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_transformers_is_pinned_to_the_minor_version_the_tests_run_on():
    """bases/fast_bert.py relies on transformers internals: the pin must admit the installed one only."""
    import transformers
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = SpecifierSet(next(d for d in deps if _name(d) == "transformers")[len("transformers"):])
    installed = Version(transformers.__version__)
    assert installed in spec
    nxt = Version(f"{installed.major}.{installed.minor + 1}.0")
    assert nxt not in spec, "transformers is not pinned to one minor version"


def test_every_folder_says_what_it_holds_and_may_import():
    import peftkit
    for init in sorted((ROOT / "peftkit").glob("*/__init__.py")):
        doc = init.read_text().split('"""')[1]
        assert "May import" in doc or "import" in doc, f"{init.parent.name}/__init__.py: say what it may import"
    assert "lint-imports" in (ROOT / "Makefile").read_text()
    assert peftkit.__doc__ and "layer" in peftkit.__doc__


def _readme_code() -> str:
    text = (ROOT / "README.md").read_text()
    return "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))


def test_the_readme_tour_names_exist():
    """Every `pk.name` and every `from peftkit... import name` in the README's Python blocks exists."""
    import importlib

    import peftkit as pk

    code = _readme_code()
    assert code, "the README has no Python tour"
    missing = [n for n in sorted(set(re.findall(r"\bpk\.([A-Za-z_]\w*)", code))) if not hasattr(pk, n)]
    for mod, names in re.findall(r"^from (peftkit[\w.]*) import ([\w ,]+?)(?:\s*#.*)?$", code, flags=re.M):
        m = importlib.import_module(mod)
        for name in [n.split(" as ")[0].strip() for n in names.split(",")]:
            if not hasattr(m, name) and importlib.util.find_spec(f"{mod}.{name}") is None:
                missing.append(f"{mod}.{name}")
    assert not missing, f"the README's tour uses names peftkit lacks: {missing}"
