"""Hyperparameter search with Optuna: TPE sampling, median pruning on per-epoch validation accuracy.

Each trial builds a method (LoRA, Adapter, Hybrid, FullFineTune or HeadOnly) from the sampled
values, applies it to a fresh copy of the base, trains it with `fit` on a subset of the training
split and reports validation accuracy after every epoch. Optuna's `MedianPruner` stops a trial
whose accuracy at epoch k is below the median of earlier trials at epoch k. The objective is the
last epoch's validation accuracy; the test split is never looked at (retrain the best config with
`best_config` + `experiments.compare` for that).

Storage. A study lives in a database, so it survives the process: by default SQLite at
runs/optuna.db, relative to the working directory like the result cache (or under $PEFTKIT_RUNS;
see peftkit.storage.runs_dir), and calling `tune` again with the same study name continues it. `n_trials` is the
number of finished trials (complete or pruned) the study should hold, counting earlier runs and
every other worker, so several processes can share one target exactly.

Several machines: give every worker the same Optuna RDB URL and study name. With PostgreSQL:

    # once, on the database host
    createuser -P peftkit && createdb -O peftkit peftkit
    # on every worker (pip install psycopg2-binary)
    python -c "from peftkit.studies.tuning import tune; tune('lora', n_trials=100,
        storage='postgresql+psycopg2://peftkit:PASSWORD@dbhost:5432/peftkit', study_name='lora-movies')"

Each worker asks for trials until the study holds 100 finished ones; TPE's "constant liar" keeps
workers from sampling the same point while trials run. SQLite is fine for processes on one
machine (it locks the file), not for several machines on a network file system.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import os
import socket
import time
from pathlib import Path

import optuna
import sqlalchemy
import torch
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from tqdm.auto import tqdm

from .. import data
from ..bases.models import load_base
from ..core.surgery import apply
from ..data.loaders import make_loaders
from ..runtime import set_threads
from ..storage import runs_dir
from ..training.loop import fit
# the search space lives in search_space.py; its public names stay importable from here
from .search_space import (ALIASES, INTEGER_KNOBS, METHOD_KNOBS, TRAIN_KNOBS, SpaceError, _as_dim, _fits,  # noqa: F401
                           build, default_space, default_start, method_knobs, parse_space, suggest)

DEFAULT_STORAGE = f"sqlite:///{runs_dir() / 'optuna.db'}"  # relative: the working directory's runs/
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class StorageError(ValueError):
    """A storage URL that Optuna cannot use, and what to write instead."""


def resolve_storage(storage=None):
    """An Optuna storage from a URL (None: SQLite at runs/optuna.db; "memory": this process only)."""
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if storage in ("memory", ":memory:"):
        return optuna.storages.InMemoryStorage()
    if storage is None:  # DEFAULT_STORAGE, with $PEFTKIT_RUNS read now
        (runs_dir()).mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{runs_dir() / 'optuna.db'}"
    if not isinstance(storage, str):
        raise StorageError(f"storage={storage!r} should be a database URL string, 'memory', or None.")
    try:
        url = make_url(storage)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"storage={storage!r} is not a database URL. Write e.g. 'sqlite:///runs/optuna.db' "
                           "or 'postgresql+psycopg2://user:password@host:5432/db'.") from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "postgres":
        raise StorageError(f"{shown}: SQLAlchemy spells PostgreSQL 'postgresql://' (not 'postgres://').")
    try:
        url.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(f"{shown}: unknown database kind {url.drivername!r}. Optuna's RDB storage takes "
                           "SQLAlchemy URLs: sqlite:///path, postgresql+psycopg2://..., mysql+pymysql://...") from None
    except ImportError as e:
        raise StorageError(f"{shown}: the database driver is not installed ({e}). For PostgreSQL: "
                           "pip install psycopg2-binary; for MySQL: pip install pymysql.") from None
    kwargs = {}
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise StorageError(f"{shown}: an in-memory SQLite database vanishes with its connection; use "
                               "storage='memory' for a throwaway study, or a file: sqlite:///runs/optuna.db.")
        folder = Path(url.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise StorageError(f"{shown}: the folder {folder} does not exist; create it, or use the default "
                               "(storage=None: runs/optuna.db).")
        kwargs = {"connect_args": {"timeout": 60}}  # wait for another worker's write lock
    lock = None
    if url.get_backend_name() == "sqlite":  # workers on one machine create the tables one at a time
        lock = open(f"{Path(url.database).expanduser()}.lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(storage, engine_kwargs=kwargs)
            except sqlalchemy.exc.SQLAlchemyError as e:
                # another worker (on another machine) was creating the same tables: they exist now
                racing = any(s in str(e) for s in ("already exists", "UNIQUE constraint", "duplicate key"))
                if not racing or attempt == 4:
                    first = str(e).strip().splitlines()[0]
                    raise StorageError(f"could not open the study database {shown}: {first}. Check that the "
                                       "server is up, the database exists and the user may create tables.") from None
                time.sleep(0.2 * (attempt + 1))
    except ImportError as e:
        raise StorageError(f"{shown}: the database driver is not installed ({e}). For PostgreSQL: "
                           "pip install psycopg2-binary.") from None
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_orphans(study: optuna.Study) -> int:
    """Fail RUNNING trials left by a killed process on this host (its pid is gone)."""
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get("worker", "")
        name, _, pid = who.rpartition(":")
        if name == host and pid.isdigit() and not _alive(int(pid)):
            optuna.trial.Trial(study, t._trial_id).set_user_attr("fail_reason", f"worker {who} is gone")
            study.tell(t.number, state=TrialState.FAIL)
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _count(study, states, below: int | None = None) -> int:
    return sum(below is None or t.number < below for t in study.get_trials(deepcopy=False, states=states))


def tune(method: str = "lora", space: dict | None = None, n_trials: int = 20, storage=None,
         study_name: str | None = None, timeout: float | None = None, *, base: str = "minilm",
         domain: str = "movies", n_train: int | None = 2000, n_val: int | None = 500, epochs: int = 2,
         max_length: int = 128, seed: int = 0, sampler_seed: int | None = None, threads: int | None = None,
         progress: bool = True, start: dict | None = None) -> optuna.Study:
    """Search `space` for `method` until the study holds `n_trials` finished trials (or `timeout`
    seconds pass); returns the Optuna study. Trials already in the study, from an earlier call or
    another worker, count towards n_trials: calling again continues, never repeats.

    n_train / n_val: random subsets of the training and validation splits (None: all), drawn with
    `seed` exactly as `experiments.run` draws them, so `best_config` retrains on the same data.
    sampler_seed: seeds TPE (None: random, so parallel workers explore different points).
    start: values for the first trial of a new study (Optuna's enqueue_trial), e.g. `default_start(method)`:
    the search then begins at the recipe it has to beat, and its best is never below it on validation.
    Ignored when the study already holds trials. The trials table's `origin` says which trial it was.
    """

    dims = parse_space(space, method)
    if start is not None:  # checked before the study is created or touched
        if not isinstance(start, dict):
            raise SpaceError(f"start={start!r} should be a dict of knob -> value, like {default_start(method, space)}.")
        outside = {k: v for k, v in start.items() if k not in dims or not _fits(dims[k], v)}
        if outside:
            raise SpaceError(f"start values {outside} are not in the space {space or default_space(method)}: "
                             "start can only set knobs the space searches, inside their ranges.")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ValueError(f"n_trials={n_trials!r} must be a positive integer (the study's target of finished trials).")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds, or None.")
    setup = {"method": method, "base": base, "domain": domain, "n_train": n_train, "n_val": n_val,
             "epochs": epochs, "max_length": max_length, "seed": seed}
    study_name = study_name or f"{method}-{base}-{domain}-n{n_train}-e{epochs}"
    study = optuna.create_study(
        storage=resolve_storage(storage), study_name=study_name, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=5),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    known = study.user_attrs.get("setup")
    if known is None:
        study.set_user_attr("setup", setup)
    elif known != setup:
        diff = {k: (known.get(k), v) for k, v in setup.items() if known.get(k) != v}
        raise ValueError(f"study {study_name!r} was run with a different set-up (was, now): {diff}. Trials on "
                         "different data are not comparable: pass another study_name.")
    _fail_orphans(study)
    if start and not study.trials:
        study.enqueue_trial({k: _as_dim(dims[k], v) for k, v in start.items()}, user_attrs={"origin": "start"},
                            skip_if_exists=True)

    if threads:
        set_threads(threads)  # at most PEFTKIT_THREADS
    splits = data.split(data.load_corpus(domain), seed=seed)
    train, val = splits["train"], splits["val"]
    for name, df, n in (("n_train", train, n_train), ("n_val", val, n_val)):
        if n is not None and not 2 <= n <= len(df):
            raise ValueError(f"{name} must be between 2 and {len(df)} for {domain}, got {n}.")
    train = data.subset({"train": train}, n_train, seed=seed, domain=domain)["train"]
    val = data.sample_rows(val, n_val, seed)
    base_model, tok = load_base(base, num_labels=2, seed=seed)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, dims)
        m, cfg = build(method, params, epochs=epochs, seed=seed)
        model = copy.deepcopy(base_model)  # same head initialisation in every trial
        apply(model, m)
        loaders = make_loaders(tok, {"train": train, "val": val}, batch_size=cfg.batch_size,
                               max_length=max_length, seed=seed)

        def report(row):
            epoch = int(round(row["epoch"]))
            trial.report(row["val_accuracy"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val accuracy {row['val_accuracy']:.4f} at epoch {epoch} is below the median")
        t0 = time.perf_counter()
        hist = fit(model, loaders["train"], loaders["val"], cfg, on_eval=report)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        last = hist.dropna(subset=["val_accuracy"]).iloc[-1]
        trial.set_user_attr("val_f1_macro", float(last["val_f1_macro"]))
        trial.set_user_attr("trainable", sum(p.numel() for p in model.parameters() if p.requires_grad))
        return float(last["val_accuracy"])

    done = _count(study, FINISHED)
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=f"tune {study_name}", disable=not progress)
    t_start = time.monotonic()
    while True:
        if timeout is not None and time.monotonic() - t_start > timeout:
            break
        # Stop when the finished trials, plus those other workers are running, reach the target.
        if _count(study, FINISHED) + _count(study, (TrialState.RUNNING,)) >= n_trials:
            break
        trial = study.ask()
        trial.set_user_attr("worker", _worker_id())
        trial.set_user_attr("origin", trial.user_attrs.get("origin", "sampler"))
        # Two workers may ask at the same moment for the last slot: the later number stands down.
        if _count(study, FINISHED + (TrialState.RUNNING,), below=trial.number) >= n_trials:
            trial.set_user_attr("fail_reason", "surplus: the study reached n_trials while this trial was created")
            study.tell(trial, state=TrialState.FAIL)
            break
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except BaseException as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:500])
            study.tell(trial, state=TrialState.FAIL)
            bar.close()
            raise
        else:
            study.tell(trial, value)
        bar.n = min(_count(study, FINISHED), n_trials)
        bar.refresh()
    bar.close()
    return study


def best_config(study: optuna.Study):
    """(Method, TrainConfig) of the study's best complete trial, ready for `experiments.compare`."""
    setup = study.user_attrs.get("setup")
    if setup is None:
        raise ValueError(f"study {study.study_name!r} was not made by peftkit.studies.tuning (it has no set-up record).")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ValueError(f"study {study.study_name!r} has no complete trial yet; run tune() first.")
    method, cfg = build(setup["method"], study.best_params, epochs=setup["epochs"], seed=setup["seed"])
    return method, dataclasses.replace(cfg, progress=True)


def trials_frame(study: optuna.Study):
    """One row per trial: number, state, value, the sampled parameters, seconds, worker."""
    df = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs"))
    df.columns = [c.removeprefix("params_").removeprefix("user_attrs_") for c in df.columns]
    return df
