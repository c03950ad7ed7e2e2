"""Hyperparameter search: the space and storage checks, pruning fed by fit's per-epoch hook,
continuing a stored study, and two processes sharing one SQLite study without losing or
duplicating a trial. Everything trains the tiny random BERT on a few dozen snippets."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import peftkit as pk
from peftkit import data
from peftkit.data.loaders import make_loaders
from peftkit.training.loop import TrainConfig, fit
from peftkit.studies.tuning import (SpaceError, StorageError, best_config, build, default_space, default_start,
                                    parse_space, resolve_storage, trials_frame, tune)

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)
SMALL = dict(base="tiny", n_train=24, n_val=16, epochs=2, progress=False)
SPACE = {"lr": (1e-4, 1e-2, "log"), "r": (2, 8), "batch_size": 8}


# --- fit's hook ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_loaders():
    model, tok = pk.load_base("tiny", num_labels=2)
    s = data.split(data.load_corpus("movies"), seed=0)
    s = {k: v.sample(24, random_state=0) for k, v in s.items()}
    return tok, make_loaders(tok, s, batch_size=8)


def test_fit_calls_on_eval_once_per_epoch(tiny_loaders):
    _, loaders = tiny_loaders
    model, _ = pk.load_base("tiny", num_labels=2)
    pk.apply(model, pk.LoRA(r=2, alpha=4))
    rows = []
    hist = fit(model, loaders["train"], loaders["val"], TrainConfig(epochs=3, progress=False), on_eval=rows.append)
    assert [round(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [r["val_accuracy"] for r in rows] == hist.val_accuracy.dropna().tolist()


def test_an_exception_from_on_eval_stops_fit_and_restores_the_mode(tiny_loaders):
    _, loaders = tiny_loaders
    model, _ = pk.load_base("tiny", num_labels=2)
    pk.apply(model, pk.LoRA(r=2, alpha=4))
    model.eval()
    seen = []

    def stop(row):
        seen.append(row["epoch"])
        raise optuna.TrialPruned("below the median")
    with pytest.raises(optuna.TrialPruned):
        fit(model, loaders["train"], loaders["val"], TrainConfig(epochs=3, progress=False), on_eval=stop)
    assert seen == [1.0] and not model.training


# --- the space -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,knobs", [
    ("lora", {"r", "alpha", "lr", "batch_size", "dropout"}),
    ("adapter", {"adapter_size", "lr", "batch_size", "dropout"}),
    ("hybrid", {"r", "alpha", "adapter_size", "lr", "batch_size", "dropout"}),
    ("full", {"lr", "batch_size"}),
])
def test_default_space_covers_the_method(method, knobs):
    space = default_space(method)
    assert set(space) == knobs
    assert space["lr"][2] == "log"
    dims = parse_space(space, method)  # and is valid
    assert dims["batch_size"] == ("categorical", [16, 32, 64])


def test_build_makes_the_method_and_config():
    m, cfg = build("hybrid", {"r": 4, "alpha": 8.0, "adapter_size": 16, "dropout": 0.1, "lr": 3e-4,
                              "batch_size": 16}, epochs=3)
    assert m == pk.Hybrid(lora=pk.LoRA(r=4, alpha=8.0, dropout=0.1), adapter=pk.Adapter(size=16, dropout=0.1))
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (3e-4, 16, 3)


@pytest.mark.parametrize("space,match", [
    ({"rank": (2, 8)}, r"unknown knob 'rank' for lora; did you mean 'r'\?.*knobs for lora"),
    ({"adapter_size": (8, 64)}, r"unknown knob 'adapter_size' for lora"),
    ({"lr": (1e-2, 1e-4)}, "low must be below high"),
    ({"lr": (0.0, 1e-2, "log")}, "log range needs low > 0"),
    ({"r": (2.5, 8)}, "integer bounds"),
    ({"dropout": (0.0, 1.5)}, r"dropout=1.5 is reachable .* but invalid"),
    ({"lr": (0.0, 1e-3)}, r"lr=0.0 is reachable .* but invalid: invalid TrainConfig: lr must be a positive"),
    ({"batch_size": []}, "empty list of choices"),
    ({"lr": (1e-4, 1e-2, "ln")}, r"\(low, high\) or \(low, high, 'log'\)"),
    ({}, "non-empty dict"),
])
def test_bad_spaces_are_explained(space, match):
    with pytest.raises(SpaceError, match=match):
        parse_space(space, "lora")


def test_unknown_method_lists_the_tunable_ones():
    with pytest.raises(SpaceError, match=r"cannot tune method 'prefix'.*'lora'"):
        parse_space(None, "prefix")


# --- storage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("url,match", [
    ("runs/optuna.db", "not a database URL"),
    ("postgres://u:secret@localhost/db", r"spells PostgreSQL 'postgresql://'"),
    ("sqlite://", "in-memory SQLite database vanishes"),
    ("sqlite:////no/such/folder/optuna.db", "folder /no/such/folder does not exist"),
    ("foodb://localhost/x", "unknown database kind 'foodb'"),
    ("postgresql+psycopg2://u:secret@localhost/db", "pip install psycopg2-binary"),
    (42, "should be a database URL string"),
])
def test_bad_storage_is_explained(url, match):
    with pytest.raises(StorageError, match=match) as e:
        resolve_storage(url)
    assert "secret" not in str(e.value)  # passwords are never echoed


def test_default_storage_is_sqlite_under_runs_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTKIT_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)  # like the result cache: runs/ of the working directory
    storage = resolve_storage(None)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert (tmp_path / "runs" / "optuna.db").exists()


# --- searching -------------------------------------------------------------------------------

def test_a_study_continues_where_it_stopped_and_refuses_another_set_up(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = tune("lora", SPACE, n_trials=2, storage=url, study_name="s", sampler_seed=0, **SMALL)
    before = [(t.number, t.params, t.value) for t in first.trials]
    study = tune("lora", SPACE, n_trials=4, storage=url, study_name="s", **SMALL)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4 and [(t.number, t.params, t.value) for t in study.trials[:2]] == before
    assert len(tune("lora", SPACE, n_trials=4, storage=url, study_name="s", **SMALL).trials) == 4  # nothing to add
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert 2 <= t.params["r"] <= 8 and 1e-4 <= t.params["lr"] <= 1e-2
        assert set(t.intermediate_values) == {1, 2} and t.value == t.intermediate_values[2]
    with pytest.raises(ValueError, match=r"different set-up.*n_train.*\(24, 30\)"):
        tune("lora", SPACE, n_trials=5, storage=url, study_name="s", **{**SMALL, "n_train": 30})
    method, cfg = best_config(study)
    assert method.r == study.best_params["r"] and cfg.lr == study.best_params["lr"] and cfg.epochs == 2
    frame = trials_frame(study)
    assert {"number", "state", "value", "r", "lr", "worker"} <= set(frame.columns)


def test_default_start_is_the_registry_recipe_inside_the_space():
    assert default_start("lora") == {"lr": pk.LoRA.default_lr, "batch_size": 32, "r": 8, "alpha": 16.0, "dropout": 0.0}
    quick = {**default_space("lora"), "lr": (2e-3, 1e-2, "log"), "batch_size": [8, 16]}
    assert default_start("lora", quick, batch_size=8)["batch_size"] == 8
    assert "batch_size" not in default_start("lora", quick)  # 32 is not a choice: the sampler draws it
    assert default_start("hybrid")["r"] == 8 and default_start("full") == {"lr": pk.FullFineTune.default_lr, "batch_size": 32}
    assert "adapter_size" not in default_start("adapter")  # its default is a reduction, not a size: drawn


def test_a_new_study_starts_at_the_given_recipe_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    start = default_start("lora", SPACE)
    assert start == {"lr": pk.LoRA.default_lr, "r": 8}
    study = tune("lora", SPACE, n_trials=2, storage=url, study_name="s", sampler_seed=0, start=start, **SMALL)
    first, second = study.trials
    assert first.params == start and first.user_attrs["origin"] == "start"
    assert second.user_attrs["origin"] == "sampler" and second.params != start
    assert list(trials_frame(study).origin) == ["start", "sampler"]
    again = tune("lora", SPACE, n_trials=3, storage=url, study_name="s", start=start, **SMALL)  # no second start
    assert [t.user_attrs["origin"] for t in again.trials] == ["start", "sampler", "sampler"]
    for bad, match in (({"r": 64}, "not in the space"), ({"dropout": 0.1}, "not in the space"), ([8], "should be a dict")):
        with pytest.raises(SpaceError, match=match):
            tune("lora", SPACE, n_trials=1, storage=f"sqlite:///{tmp_path / 'other.db'}", start=bad, **SMALL)
    assert not (tmp_path / "other.db").exists()  # refused before any study was created


def test_a_trial_below_the_median_is_pruned_after_its_first_epoch():
    study = optuna.create_study(direction="maximize", study_name="p")
    study.set_user_attr("setup", {"method": "lora", "base": "tiny", "domain": "movies", "n_train": 24,
                                  "n_val": 16, "epochs": 2, "max_length": 128, "seed": 0})
    dist = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for lr in (1e-3, 2e-3, 3e-3):  # three earlier trials that reached 100% at every epoch
        study.add_trial(create_trial(params={"lr": lr}, distributions=dist, value=1.0,
                                     intermediate_values={1: 1.0, 2: 1.0}))
    storage = study._storage
    study = tune("lora", {"lr": (1e-4, 1e-2, "log"), "batch_size": 8}, n_trials=4, storage=storage,
                 study_name="p", **SMALL)
    last = study.trials[-1]
    assert last.state == TrialState.PRUNED and list(last.intermediate_values) == [1]


def test_bad_targets_and_study_without_set_up():
    with pytest.raises(ValueError, match="n_trials=0 must be a positive integer"):
        tune("lora", SPACE, n_trials=0, storage="memory", **SMALL)
    with pytest.raises(ValueError, match="n_train must be between 2 and"):
        tune("lora", SPACE, n_trials=1, storage="memory", **{**SMALL, "n_train": 10**6})
    with pytest.raises(ValueError, match="not made by peftkit.studies.tuning"):
        best_config(optuna.create_study())


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from peftkit.studies.tuning import tune
    url, me, other, n = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    me.touch()
    deadline = time.time() + 120
    while not other.exists() and time.time() < deadline:  # start together: both import first
        time.sleep(0.05)
    # Each worker's first trial waits until the other has begun one, so both take part however
    # unevenly a busy machine schedules them (tiny trials would otherwise let one worker do all).
    import peftkit.studies.tuning  # tune calls the fit it imported: patch it there, not in training.loop
    real_fit, first = peftkit.studies.tuning.fit, [True]
    def fit(*args, **kwargs):
        if first[0]:
            first[0] = False
            Path(f"{me}.trial").touch()
            while not Path(f"{other}.trial").exists() and time.time() < deadline + 120:
                time.sleep(0.05)
        return real_fit(*args, **kwargs)
    peftkit.studies.tuning.fit = fit
    tune("lora", {"lr": (1e-4, 1e-2, "log"), "r": (2, 8), "batch_size": 8}, n_trials=n, storage=url,
         study_name="shared", base="tiny", n_train=24, n_val=16, epochs=2, progress=False)
""")


def test_two_processes_share_one_sqlite_study_exactly(tmp_path):
    url, n = f"sqlite:///{tmp_path / 'shared.db'}", 8
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    a, b = tmp_path / "a.ready", tmp_path / "b.ready"
    procs = [subprocess.Popen([sys.executable, str(script), url, str(me), str(other), str(n)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other in ((a, b), (b, a))]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert Path(f"{a}.trial").exists() and Path(f"{b}.trial").exists()  # the patched fit ran in both workers
    study = optuna.load_study(study_name="shared", storage=url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == n, json.dumps([(t.number, str(t.state)) for t in study.trials])
    numbers = [t.number for t in study.trials]
    assert len(set(numbers)) == len(numbers) == len(study.trials)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    others = study.get_trials(states=(TrialState.FAIL,))
    assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in others)
    assert all(set(t.params) == {"lr", "r"} for t in finished)
    assert len({t.user_attrs["worker"] for t in finished}) == 2, "both processes should have run trials"
