"""Experiments: one method trained and measured (`run`), many side by side (`compare`).

`compare` runs each configuration in a fresh Python process (forked from a warm server on Linux:
`forkserver`), so peak-memory figures (ru_maxrss on CPU) belong to that run alone, and caches each
result row in `runs/results.jsonl` under a hash of the full configuration: a later notebook asking
for the same run reuses the row.
`runs/` is relative to the working directory (or $PEFTKIT_RUNS; see peftkit.storage.runs_dir).

Seeds are an axis: `compare(..., seeds=(0, 1, 2))` runs each configuration once per seed (the
seed sets the head's and the adapter's initialisation, the data order and dropout; the split and
the n_train sample stay those of `split_seed`). The seed is in the cache key, so adding a seed
reuses the others. Each row records which test items it got right (`correct`), so `summary`
can pair methods item by item. `lr="val"` chooses each family's learning rate on validation
(`lr_search`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .. import data
from ..bases.models import load_base
from ..compress import quantize_base
from ..core.methods import Method
from ..core.surgery import apply, trainable_fraction
from ..data.loaders import make_loaders
from ..files.adapter_file import adapter_bytes, load_adapter, save_adapter
from ..runtime import capped_threads, environment, peak_memory_mib, reset_peak_memory, resolve_device
from ..storage import append_lines, exclusive, read_jsonl, runs_dir
from ..training.loop import TrainConfig, fit
from ..training.metrics import evaluate
from . import forkserver

ROOT = Path(__file__).resolve().parents[2]  # the repository: peftkit/<layer>/<module>.py
# runs/results.jsonl relative to the working directory (or under $PEFTKIT_RUNS), as the CLI's --cache
DEFAULT_CACHE = runs_dir() / "results.jsonl"
_NOT_IN_KEY = ("progress", "checkpoint_dir", "checkpoint_every", "device")
_KEYED_WHEN_SET = {"attention_dropout": None, "cpu_bf16": False, "fast_dropout": False, "validate": True}  # field -> its default


def config_key(spec: dict) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_spec(method: Method, base="minilm", domain="movies", n_train=None, cfg=None,
              max_length: int = 128, eval_domains=True, n_eval=None, base_bits=None, split_seed=None) -> dict:
    """The configuration a run's cache key hashes. split_seed=None: the split follows cfg.seed, as
    every run did before seeds became an axis; it is keyed only when it differs from cfg.seed, so
    rows cached then keep their keys (a seed-0 run on the seed-0 split has the same key as ever)."""
    cfg = cfg or TrainConfig(lr=method.default_lr)
    tc = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    for k, default in _KEYED_WHEN_SET.items():  # fields added later: absent at their default, so older keys stay valid
        if k in tc and tc[k] is default:
            tc.pop(k)
    return {"method": method.to_dict(), "base": base, "domain": domain, "n_train": n_train,
            "train": tc, "max_length": max_length, "eval_domains": bool(eval_domains), "n_eval": n_eval,
            **({"base_bits": base_bits} if base_bits else {}),  # absent when unused: older keys stay valid
            **({"split_seed": split_seed} if split_seed is not None and split_seed != cfg.seed else {})}


def config_id(spec: dict) -> str:
    """The configuration without its seed: the runs of one configuration at several seeds share it."""
    s = json.loads(json.dumps(spec, default=str))
    train = dict(s.get("train") or {})
    seed = train.pop("seed", 0)
    s["train"], s["split_seed"] = train, s.get("split_seed", seed)
    return config_key(s)


def _test_items(df) -> str:
    """A short fingerprint of a test split's texts: runs with the same one were tested on the same items."""
    return hashlib.sha256("\n".join(map(str, df["text"])).encode()).hexdigest()[:12]


def run(method: Method, base: str = "minilm", domain: str = "movies", n_train: int | None = None,
        cfg=None, max_length: int = 128, eval_domains: bool = True, out: str | None = None,
        n_eval: int | None = None, base_bits: int | None = None, split_seed: int = 0) -> dict:
    """Train `method` on `domain` and measure it. Returns one flat result row (a dict).

    n_train: a random subset of the training split; n_eval: caps every validation and test
    split (for quick runs; None evaluates on all of them). base_bits: freeze the base's Linear
    weights at that many bits (simulated, per channel) before applying the method: QLoRA's setting.
    cfg.seed seeds initialisation, data order and dropout; split_seed the split and the subsets.
    """
    cfg = cfg or TrainConfig(lr=method.default_lr)
    spec = make_spec(method, base, domain, n_train, cfg, max_length, eval_domains, n_eval, base_bits, split_seed)
    splits = data.subset(data.split(data.load_corpus(domain), seed=split_seed), n_train, n_eval, split_seed, domain)
    own_peak = reset_peak_memory(str(resolve_device(cfg.device)))  # this run's peak, not earlier runs' in this process
    model, tok = _base(base, cfg.seed, base_bits)
    apply(model, method)
    loaders = make_loaders(tok, splits, batch_size=cfg.batch_size, max_length=max_length, seed=cfg.seed)
    t0 = time.perf_counter()
    hist = fit(model, loaders["train"], loaders["val"], cfg)
    train_time = time.perf_counter() - t0
    device = str(resolve_device(cfg.device))
    step_secs = hist.elapsed.diff().dropna()
    if "val_accuracy" in hist:  # steps that also evaluated are not training-step timings
        step_secs = step_secs[hist.val_accuracy.isna().iloc[1:].to_numpy()]
    total = sum(p.numel() for p in model.parameters())
    row = {"key": config_key(spec), "label": method.describe(), "method": method.name,
           "spec": spec, "base": base, "domain": domain, "n_train": len(splits["train"]),
           "seed": cfg.seed, "split_seed": split_seed, "config": config_id(spec),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "total": total, "trainable_pct": 100 * trainable_fraction(model),
           "epochs": cfg.epochs, "lr": cfg.lr, "steps": int(hist.step.iloc[-1]),
           "train_seconds": train_time,
           "sec_per_step": float(step_secs.median()) if len(step_secs) else train_time / len(hist),
           "peak_mem_mib": peak_memory_mib(device), "peak_mem_scope": "run" if own_peak else "process",
           "adapter_bytes": adapter_bytes(model),
           "final_loss": float(hist.loss.tail(10).mean())}
    test = evaluate(model, loaders["test"], num_labels=2, per_item=True)
    row.update(accuracy=test["accuracy"], f1_macro=test["f1_macro"], test_loss=test["loss"], confusion=test["confusion"],
               n_test=test["n"], n_val=len(splits["val"]), test_items=_test_items(splits["test"]),
               correct={domain: test["correct"]})
    if eval_domains:
        for other in data.FILES:
            if other == domain:
                m = test
            else:
                od = data.sample_rows(data.split(data.load_corpus(other), seed=split_seed)["test"], n_eval, split_seed)
                m = evaluate(model, make_loaders(tok, {"test": od}, batch_size=cfg.batch_size,
                                                 max_length=max_length)["test"], num_labels=2, per_item=True)
                row["correct"][other] = m["correct"]
            row[f"acc_{other}"], row[f"f1_{other}"] = m["accuracy"], m["f1_macro"]
    bf16 = (cfg.bf16 and device.startswith("cuda")) or (cfg.cpu_bf16 and device == "cpu")
    row["env"] = {**environment(device), "precision": "bf16 autocast" if bf16 else "fp32"}
    row["history"] = hist[[c for c in ("step", "loss", "lr", "val_accuracy", "val_f1_macro") if c in hist]].to_dict("list")
    row["val_accuracy"] = _last_val_accuracy(row["history"])
    if out:
        row["adapter_dir"] = str(out)
        save_adapter(model, out)
        Path(out, "metrics.json").write_text(json.dumps(row, indent=2, default=str))
    return row


def _base(base: str, seed: int, bits: int | None):
    model, tok = load_base(base, num_labels=2, seed=seed)
    if bits:
        quantize_base(model, bits, inplace=True)
    return model, tok


def read_cache(path=DEFAULT_CACHE) -> dict[str, dict]:
    """Result rows by key (the last row of a key wins). A line that is not a result row (torn by a
    killed writer, null, a list, a number, invalid UTF-8, no string "key") is skipped, and a
    warning says how many were; the file is left as it is."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows, skipped = read_jsonl(path)
    good = [r for r in rows if isinstance(r.get("key"), str)]
    skipped += len(rows) - len(good)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} line(s) that are not result rows (a write torn by a killed run, "
                      f"or an edit); using the other {len(good)}. Delete those lines to silence this.", stacklevel=2)
    return {r["key"]: r for r in good}


def append_cache(row: dict, path=DEFAULT_CACHE) -> None:
    """Append `row` as one line, under a lock, starting on a fresh line (`storage.append_lines`)."""
    append_lines(Path(path), [json.dumps(row, default=str)])


def _run_in_subprocess(spec: dict, threads: int | None) -> dict:
    """One run in a process of its own: forked from the warm server where fork is safe (Linux), else a new interpreter."""
    threads = capped_threads(threads)  # at most PEFTKIT_THREADS
    if forkserver.available():
        try:
            return forkserver.server(threads).run(spec)
        except forkserver.WorkerError as err:
            raise RuntimeError(f"the run for {spec['method']} failed in its subprocess:\n{err}") from None
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "peftkit.studies.experiments", "--worker"], input=json.dumps(spec, default=str),
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"the run for {spec['method']} failed in its subprocess:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(methods, base: str = "minilm", domain: str = "movies", n_train: int | None = None,
            cfg=None, max_length: int = 128, eval_domains: bool = True, cache=DEFAULT_CACHE,
            fresh_process: bool = True, threads: int | None = None, progress: bool = True,
            n_eval: int | None = None, need_adapters: bool = False, base_bits: int | None = None,
            seeds=None, split_seed: int = 0, lr=None, lr_seeds=None) -> pd.DataFrame:
    """Run each method once per seed (reusing cached rows) and return one DataFrame row per run.

    seeds: an int or a sequence of them; None runs once, at cfg.seed (0 without a cfg). The seed
    sets initialisation, data order and dropout; the split stays `split_seed`'s. `summarize`
    turns the rows into one per configuration, with intervals.
    lr: None trains at cfg.lr when a cfg is given, else at each method's registry default
    (`Method.default_lr`); a number trains every method at it; "default" at the registry's;
    a dict {family: rate} (e.g. {"lora": 5e-3, "full": 2e-4}) at those; "val" chooses each
    family's rate on the validation split over its registry grid (`Method.lr_grid`) with the
    seeds `lr_seeds` (default: `seeds`), see `lr_search`. The search is kept in
    `df.attrs["lr_search"]`, and the rows report the rate in `lr`, chosen by `lr_chosen_by`.

    Each trained adapter is saved under `runs/adapters/<key>/` (next to the cache), and the row's
    `adapter_dir` names it. need_adapters=True retrains a cached row whose adapter folder is gone.
    fresh_process=False runs in this process: faster to start. Each run's peak memory is then measured from its
    own start (`runtime.reset_peak_memory`), over what the process already holds; where the peak cannot be reset
    (not Linux) it is the process's so far, and the row's `peak_mem_scope` says "process" instead of "run".
    """
    methods = list(methods)
    base_cfg = cfg or TrainConfig()
    seeds = as_seeds(seeds, base_cfg.seed)
    search = None
    if isinstance(lr, str) and lr == "val":
        from .lr_search import lr_search  # it runs compare itself
        search = lr_search(methods, seeds=seeds if lr_seeds is None else as_seeds(lr_seeds, 0), base=base,
                           domain=domain, n_train=n_train, cfg=cfg, max_length=max_length, eval_domains=eval_domains,
                           cache=cache, fresh_process=fresh_process, threads=threads, progress=progress,
                           n_eval=n_eval, base_bits=base_bits, split_seed=split_seed)
        lr = search.rates
    rates = [rate_for(m, lr, cfg) for m in methods]  # every rate checked before anything trains
    cached = read_cache(cache) if cache else {}
    stamp = _cache_stamp(cache) if cache else None
    rows = []
    jobs = [(m, r, s) for m, r in zip(methods, rates) for s in seeds]
    bar = tqdm(jobs, desc="compare", disable=not progress)
    for method, rate, seed in bar:
        mcfg = dataclasses.replace(base_cfg, lr=rate, seed=seed)
        spec = make_spec(method, base, domain, n_train, mcfg, max_length, eval_domains, n_eval, base_bits, split_seed)
        key = config_key(spec)
        bar.set_postfix_str(f"{method.describe()} seed {seed}")
        hit = cached.get(key)
        if hit is not None and not (need_adapters and not _has_adapter(hit)):
            rows.append({**hit, "cached": True})
            continue
        # Another process (a notebook beside this one, a second test worker) may be training this very run:
        # one trains it, the other waits at the key's lock and then finds the row in the cache.
        with (exclusive(_lock_path(cache, key)) if cache else contextlib.nullcontext()):
            if cache and (seen := _cache_stamp(cache)) != stamp:
                cached, stamp = read_cache(cache), seen
                hit = cached.get(key)
                if hit is not None and not (need_adapters and not _has_adapter(hit)):
                    rows.append({**hit, "cached": True})
                    continue
            rows.append({**_train_one(method, spec, mcfg, cache, key, fresh_process, threads, base, domain, n_train,
                                      max_length, eval_domains, n_eval, base_bits, split_seed), "cached": False})
    df = results_frame(rows)
    if search is not None:
        df["lr_chosen_by"] = "validation"
        df.attrs["lr_search"] = search
    return df


def _train_one(method, spec, mcfg, cache, key, fresh_process, threads, base, domain, n_train, max_length,
               eval_domains, n_eval, base_bits, split_seed) -> dict:
    """Train and score one run of `compare`, append its row to the cache, and return it."""
    quiet = dataclasses.replace(mcfg, progress=False)
    out = str((Path(cache).parent / "adapters" / key).resolve()) if cache else None  # the worker runs in ROOT
    if fresh_process:
        row = _run_in_subprocess({**spec, "cfg": dataclasses.asdict(quiet), "out": out, "split_seed": split_seed},
                                 threads)
    else:
        row = run(method, base, domain, n_train, quiet, max_length, eval_domains, out=out, n_eval=n_eval,
                  base_bits=base_bits, split_seed=split_seed)
    row["own_process"] = bool(fresh_process)  # False: its peak memory also counts what this process held
    if cache:
        append_cache(row, cache)
    return row


def _lock_path(cache, key: str) -> Path:
    """The lock file of one run's key, beside the cache (`runs/.locks/`)."""
    return Path(cache).parent / ".locks" / f"{key}.lock"


def _cache_stamp(cache) -> tuple | None:
    """The cache file's size and change time: when they moved, another process appended rows."""
    try:
        st = os.stat(cache)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def as_seeds(seeds, default: int = 0) -> tuple[int, ...]:
    """seeds as a tuple of distinct ints: None gives (default,), an int (int,)."""
    if seeds is None:
        return (default,)
    seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds must be distinct integers, e.g. (0, 1, 2); got {seeds!r}.")
    return seeds


def rate_for(method: Method, lr, cfg=None) -> float:
    """The learning rate `compare` trains `method` at, for its `lr` argument (not "val")."""
    if lr is None:
        return cfg.lr if cfg is not None else method.default_lr
    if isinstance(lr, str) and lr == "default":
        return method.default_lr
    if isinstance(lr, dict):
        for k in (method.describe(), method.name):
            if k in lr:
                return float(lr[k])
        raise ValueError(f"lr has no rate for {method.describe()!r}: give one for its family {method.name!r} "
                         f"(it has {sorted(lr)}).")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0:
        return float(lr)
    raise ValueError(f"lr={lr!r}: give None, a positive number, 'default', 'val' or a dict {{family: rate}}.")


def _has_adapter(row: dict) -> bool:
    d = row.get("adapter_dir")
    return bool(d) and (Path(d) / "adapter.json").exists()


TABLE_COLUMNS = ["label", "method", "seed", "accuracy", "f1_macro", "val_accuracy", "trainable", "trainable_pct",
                 "sec_per_step", "peak_mem_mib", "adapter_bytes", "train_seconds", "epochs", "lr", "n_train"]


def _last_val_accuracy(history) -> float:
    """The last validation accuracy in a row's history (NaN when it never evaluated)."""
    vals = [v for v in (history or {}).get("val_accuracy", []) if v is not None and v == v]
    return float(vals[-1]) if vals else float("nan")


def results_frame(rows) -> pd.DataFrame:
    """Result rows as a DataFrame, the table's columns first. `val_accuracy` (the last validation
    accuracy) is what to choose a learning rate or a rank by: the test split stays for reporting."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return df
    if "history" in df:  # rows cached before val_accuracy was recorded carry it in their history
        derived = df["history"].map(lambda h: _last_val_accuracy(h if isinstance(h, dict) else None))
        df["val_accuracy"] = df["val_accuracy"].fillna(derived) if "val_accuracy" in df else derived
    if "spec" in df:  # rows cached before seeds were an axis: their seed, split seed and configuration
        specs = df["spec"].map(lambda s: s if isinstance(s, dict) else None)
        seed = specs.map(lambda s: (s.get("train") or {}).get("seed", 0) if s else None)
        split = [s.get("split_seed", k) if s else None for s, k in zip(specs, seed)]
        config = specs.map(lambda s: config_id(s) if s else None)
        for col, derived in (("seed", seed), ("split_seed", pd.Series(split, index=df.index)), ("config", config)):
            df[col] = df[col].fillna(derived) if col in df else derived
    first = [c for c in TABLE_COLUMNS if c in df]
    return df[first + [c for c in df.columns if c not in first]]


def run_spec(spec: dict) -> dict:
    """`run` for a JSON spec (what a worker process receives): its result row."""
    cfg = TrainConfig(**spec["cfg"])
    return run(Method.from_dict(spec["method"]), spec["base"], spec["domain"], spec["n_train"],
               cfg, spec["max_length"], spec["eval_domains"], out=spec.get("out"),
               n_eval=spec.get("n_eval"), base_bits=spec.get("base_bits"), split_seed=spec.get("split_seed", cfg.seed))


def _worker() -> int:
    print(json.dumps(run_spec(json.loads(sys.stdin.read())), default=str))
    return 0


def transfer_matrix(df: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """Train domain (rows) x test domain (columns) from result rows with acc_/f1_ columns."""
    m = df.drop_duplicates("domain", keep="last").set_index("domain")
    out = m[[f"{metric}_{d}" for d in data.FILES]]
    out.columns = list(data.FILES)
    return out.reindex([d for d in data.FILES if d in out.index])


if __name__ == "__main__" and "--worker" in sys.argv:
    raise SystemExit(_worker())


def trained_model(method: Method, base: str = "minilm", domain: str = "movies", n_train: int | None = None,
                  cfg=None, n_eval: int | None = None, cache=DEFAULT_CACHE, fresh_process: bool = True,
                  threads: int | None = None, base_bits: int | None = None, split_seed: int = 0):
    """(model, tokenizer, result row) for a trained `method`: from the cache when its adapter is
    there (as `compare` left it), else trained now. The model is a fresh base with the adapter loaded."""
    cfg = cfg or TrainConfig(lr=method.default_lr)
    if not cache:
        raise ValueError("trained_model keeps adapters beside the result cache: pass a cache path, not None.")
    row = compare([method], base=base, domain=domain, n_train=n_train, cfg=cfg, cache=cache, progress=False,
                  n_eval=n_eval, fresh_process=fresh_process, threads=threads, need_adapters=True,
                  base_bits=base_bits, split_seed=split_seed).iloc[0].to_dict()
    model, tok = _base(base, cfg.seed, base_bits)
    load_adapter(model, row["adapter_dir"])
    return model.eval(), tok, row
