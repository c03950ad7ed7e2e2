"""Experiments, the result cache and the command line."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit as pk
from peftkit.studies.experiments import compare, config_key, make_spec, read_cache, run
from peftkit.training.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = TrainConfig(epochs=1, lr=1e-3, batch_size=16, progress=False)


def test_run_returns_a_full_row(tmp_path):
    row = run(pk.LoRA(r=2, alpha=4), base="tiny", domain="tweets", n_train=64, cfg=CFG, out=str(tmp_path))
    for key in ("accuracy", "f1_macro", "trainable", "total", "trainable_pct", "sec_per_step", "peak_mem_mib",
                "adapter_bytes", "train_seconds", "acc_movies", "f1_amazon", "acc_nyt", "f1_tweets"):
        assert key in row, key
    assert row["trainable"] == 2 * 2 * 2 * (32 + 32) + 32 * 2 + 2  # 2 layers x (q, v) x r(in+out) + head
    assert row["env"]["torch"] and row["env"]["threads"] >= 1 and row["env"]["device"] == "cpu"
    assert row["acc_tweets"] == row["accuracy"] and row["n_train"] == 64
    assert (tmp_path / "adapter.safetensors").exists() and json.loads((tmp_path / "metrics.json").read_text())["key"] == row["key"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident peak resets through Linux's /proc")
def test_runs_in_one_process_each_measure_their_own_peak_memory():
    """A notebook trains its quick runs in its own process, one after another. Each row's peak is its run's (from
    the run's start), not the process's so far: before, every later run repeated the largest earlier peak."""
    from peftkit.runtime import peak_memory_mib
    big = torch.ones(150_000_000)  # 600 MB resident, as an earlier, larger run would have left the process's peak
    big.add_(1)
    del big
    process_peak = peak_memory_mib("cpu")
    rows = compare([pk.LoRA(r=2, alpha=4), pk.HeadOnly()], base="tiny", domain="tweets", n_train=32, cfg=CFG, cache=None,
                   eval_domains=False, n_eval=16, fresh_process=False, progress=False)
    assert rows.peak_mem_scope.tolist() == ["run", "run"]
    assert (rows.peak_mem_mib < process_peak - 400).all(), (rows.peak_mem_mib.tolist(), process_peak)
    assert rows.peak_mem_mib.gt(0).all()


def test_compare_caches_rows_and_keys_on_the_whole_config(tmp_path):
    cache = tmp_path / "results.jsonl"
    methods = [pk.HeadOnly(), pk.LoRA(r=2, alpha=4)]
    first = compare(methods, base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache, eval_domains=False, progress=False)
    assert list(first.cached) == [False, False] and len(read_cache(cache)) == 2
    assert first.peak_mem_mib.gt(0).all()  # each measured in its own process
    again = compare(methods, base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache, eval_domains=False, progress=False)
    assert list(again.cached) == [True, True]
    assert again.accuracy.tolist() == first.accuracy.tolist()
    # every trained adapter is kept beside the cache and loads back onto a fresh base
    lora_dir = Path(first.adapter_dir.iloc[1])
    assert lora_dir.parent == tmp_path / "adapters" and lora_dir.name == first.key.iloc[1]
    model, _ = pk.load_base("tiny", seed=0)
    pk.load_adapter(model, lora_dir)
    import shutil
    shutil.rmtree(lora_dir)  # an adapter folder that is gone is retrained only when one is needed
    assert list(compare(methods, base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache,
                        eval_domains=False, progress=False).cached) == [True, True]
    need = compare(methods, base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache, eval_domains=False,
                   progress=False, need_adapters=True)
    assert list(need.cached) == [True, False] and (lora_dir / "adapter.json").exists()
    a = config_key(make_spec(pk.LoRA(), "tiny", "tweets", 48, CFG))
    assert a == config_key(make_spec(pk.LoRA(), "tiny", "tweets", 48, TrainConfig(epochs=1, lr=1e-3, batch_size=16, progress=True)))
    assert a != config_key(make_spec(pk.LoRA(), "tiny", "tweets", 48, TrainConfig(epochs=1, lr=2e-3, batch_size=16)))
    assert a != config_key(make_spec(pk.LoRA(r=4), "tiny", "tweets", 48, CFG))


def test_results_frame_gives_the_last_validation_accuracy_for_old_and_new_rows():
    from peftkit.studies.experiments import results_frame
    old = {"label": "lora r=8", "accuracy": 0.7, "history": {"step": [1, 2, 3], "val_accuracy": [None, 0.6, 0.65]}}
    new = {"label": "full", "accuracy": 0.8, "val_accuracy": 0.75, "history": {"step": [1], "val_accuracy": [0.1]}}
    never = {"label": "head only", "accuracy": 0.5, "history": {"step": [1]}}
    df = results_frame([old, new, never])
    assert df.val_accuracy.iloc[0] == 0.65 and df.val_accuracy.iloc[1] == 0.75 and math.isnan(df.val_accuracy.iloc[2])
    assert list(df.columns[:3]) == ["label", "accuracy", "val_accuracy"]


def test_cache_survives_a_torn_line(tmp_path):
    cache = tmp_path / "results.jsonl"
    cache.write_text('{"key": "a", "accuracy": 1}\n{"key": "b", "accur')
    assert list(read_cache(cache)) == ["a"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, cwd=ROOT)


def _cli_here(capsys, *args):
    """`python -m peftkit ARGS` without a new interpreter: (exit code, stdout, stderr)."""
    from peftkit import cli
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_train_writes_adapter_and_metrics(tmp_path):
    p = _cli("train", "--base", "tiny", "--method", "adapter", "--n-train", "48", "--epochs", "1",
             "--no-progress", "--no-cross-domain", "--cpu-bf16", "--out", str(tmp_path / "x"))
    assert p.returncode == 0, p.stderr
    metrics = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert metrics["method"] == "adapter" and metrics["spec"]["train"]["cpu_bf16"] is True
    assert metrics["env"]["precision"] == "bf16 autocast"
    restored = pk.load_adapter(pk.load_base("tiny")[0], tmp_path / "x")
    assert isinstance(restored.peftkit.method, pk.Adapter)


@pytest.mark.parametrize("args,match", [
    (["train", "--out", "x", "--epochs", "0"], "epochs"),
    (["train", "--out", "x", "--method", "prefix"], "unknown method"),
    (["train", "--out", "x", "--r", "abc"], "invalid int"),
    (["train", "--out", "x", "--r", "0"], "positive integer"),
    (["train", "--out", "x", "--domain", "reddit"], "unknown domain"),
    (["train", "--out", "x", "--targets", "qurey", "--base", "tiny"], "did you mean 'query'"),
    (["train"], "--out"),
    (["compare", "--methods", "lora,nope"], "unknown method"),
    (["frobnicate"], "invalid choice"),
])
def test_cli_bad_arguments_give_one_line_and_exit_2(args, match, capsys):
    code, _, err = _cli_here(capsys, *args)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match.lower() in lines[0].lower()


def test_the_real_entry_point_refuses_in_one_line_too():
    """The cases above call `cli.main` in this process (each new interpreter costs 5 s of imports);
    this one goes through `python -m peftkit`, as a user's shell does."""
    p = _cli("train", "--out", "x", "--domain", "reddit")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown domain" in lines[0].lower(), p.stderr


def test_the_cli_and_the_package_leave_nbformat_and_sqlalchemy_unimported():
    """Every `python -m peftkit` (the HTTP service, its restarts, the workers) pays for what the package
    imports: nbformat (about 1 s) only `peftkit run` needs, sqlalchemy (a third of a second) only tuning."""
    code = "import sys, peftkit, peftkit.cli; print(sorted(m for m in ('nbformat', 'sqlalchemy') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "[]", p.stdout + p.stderr


@pytest.mark.parametrize("cmd", ["train", "compare", "data", "demo"])
def test_cli_help(cmd, capsys):
    code, out, _ = _cli_here(capsys, cmd, "--help")
    assert code == 0 and "usage" in out


def test_trained_model_reuses_the_cached_adapter_and_evaluates_by_domain(tmp_path):
    from peftkit.studies.experiments import trained_model
    from peftkit.training.metrics import evaluate_domains
    cache = tmp_path / "results.jsonl"
    kw = dict(base="tiny", domain="tweets", n_train=48, cfg=CFG, cache=cache, n_eval=40, fresh_process=False)
    model, tok, row = trained_model(pk.LoRA(r=2, alpha=4), **kw)
    again, _, row2 = trained_model(pk.LoRA(r=2, alpha=4), **kw)
    assert not row["cached"] and row2["cached"]
    table = evaluate_domains(model, tok, n_eval=40)
    assert list(table.domain) == ["movies", "amazon", "nyt", "tweets"] and (table.n == 40).all()
    assert table.set_index("domain").accuracy["tweets"] == pytest.approx(row["acc_tweets"])
    assert evaluate_domains(again, tok, ["tweets"], n_eval=40).accuracy[0] == pytest.approx(row["acc_tweets"])
    with pytest.raises(ValueError, match="cache"):
        trained_model(pk.LoRA(r=2, alpha=4), **{**kw, "cache": None})


def test_base_bits_trains_on_a_rounded_base_and_keys_apart(tmp_path):
    from peftkit.studies.experiments import trained_model
    kw = dict(base="tiny", domain="tweets", n_train=32, cfg=CFG, cache=tmp_path / "r.jsonl", n_eval=20, fresh_process=False)
    model, _, row = trained_model(pk.LoRA(r=2, alpha=4), base_bits=4, **kw)
    assert row["spec"]["base_bits"] == 4
    assert "base_bits" not in make_spec(pk.LoRA(), "tiny")  # old cache keys stay valid
    w = model.bert.encoder.layer[0].attention.self.query.base.weight
    assert len(torch.unique(w[0])) <= 15


# --- seeds, per-item records, learning rates chosen on validation --------------------------------

TINY = dict(base="tiny", domain="tweets", n_train=32, n_eval=40, eval_domains=False, fresh_process=False, progress=False)


def test_seeds_are_an_axis_and_adding_one_reuses_the_others(tmp_path):
    cache = tmp_path / "results.jsonl"
    m = pk.LoRA(r=2, alpha=4)
    first = compare([m], cfg=CFG, cache=cache, seeds=(0, 1), **TINY)
    assert list(first.seed) == [0, 1] and list(first.cached) == [False, False]
    more = compare([m], cfg=CFG, cache=cache, seeds=(0, 1, 2), **TINY)
    assert list(more.seed) == [0, 1, 2] and list(more.cached) == [True, True, False]
    assert len(read_cache(cache)) == 3 and more.config.nunique() == 1 and more.key.nunique() == 3
    # the split stays put: the same test items at every seed; the seed changes the training
    assert more.test_items.nunique() == 1 and more.final_loss.nunique() == 3
    assert all(len(c["tweets"]) == n == 40 for c, n in zip(more.correct, more.n_test))
    # a seed-0 run on the seed-0 split keeps the key it had before seeds were an axis
    assert more.key.iloc[0] == config_key(make_spec(m, "tiny", "tweets", 32, CFG, eval_domains=False, n_eval=40))
    assert "split_seed" not in make_spec(m, "tiny", "tweets", 32, CFG, split_seed=0)
    assert make_spec(m, "tiny", "tweets", 32, TrainConfig(seed=1), split_seed=0)["split_seed"] == 0
    other = compare([m], cfg=CFG, cache=cache, seeds=0, split_seed=1, **TINY)
    assert not other.cached.iloc[0] and other.test_items.iloc[0] != more.test_items.iloc[0]
    s = pk.summarize(more, reference=None)
    assert len(s) == 1 and s.n_seeds.iloc[0] == 3 and s.accuracy_lo.iloc[0] <= s.accuracy.iloc[0] <= s.accuracy_hi.iloc[0]
    with pytest.raises(ValueError, match="distinct integers"):
        compare([m], cfg=CFG, cache=cache, seeds=(1, 1), **TINY)


def test_per_item_correctness_is_in_the_rows_order():
    from peftkit import data
    from peftkit.data.loaders import make_loaders
    from peftkit.training.metrics import evaluate, predict
    model, tok = pk.load_base("tiny", seed=0)
    test = data.sample_rows(data.split(data.load_corpus("tweets"))["test"], 50, 0)
    shortest_first = make_loaders(tok, {"test": test})["test"]
    as_is = make_loaders(tok, {"test": test}, eval_by_length=False)["test"]
    y, p, _ = predict(model, as_is)
    assert evaluate(model, shortest_first, per_item=True)["correct"] == "".join("1" if c else "0" for c in y == p)


def test_lr_val_chooses_each_familys_rate_on_validation(tmp_path):
    from peftkit.studies.lr_search import lr_search, rate_ranking
    cache = tmp_path / "results.jsonl"
    methods = [pk.HeadOnly()]
    df = compare(methods, cfg=CFG, cache=cache, seeds=(0,), lr="val", **TINY)
    search = df.attrs["lr_search"]
    t = search.table
    assert list(t.lr) == list(pk.HeadOnly.lr_choices()) and t.chosen.sum() == 1
    assert search.rates["head_only"] == t.loc[t.val_accuracy.idxmax(), "lr"] == df.lr.iloc[0]
    assert "accuracy" not in t and (df.lr_chosen_by == "validation").all()  # test accuracy: only at the chosen rate
    assert df.cached.all()  # the chosen run is the search's own
    again = lr_search(methods, seeds=(0,), cfg=CFG, cache=cache, **TINY)
    assert again.rates == search.rates and again.runs.cached.all()  # the choice comes back from the cache
    view = rate_ranking(search, df)
    assert view["default lr"].iloc[0] == pk.HeadOnly.default_lr and view["rank at chosen"].iloc[0] == 1
    assert compare(methods, cfg=CFG, cache=cache, lr={"head_only": 1e-2}, **TINY).lr.iloc[0] == 1e-2
    with pytest.raises(ValueError, match="no rate for"):
        compare([pk.LoRA()], cfg=CFG, cache=cache, lr={"head_only": 1e-2}, **TINY)
    lines = cache.read_text()
    with pytest.raises(ValueError, match="validate=False"):  # refused before anything trains
        compare([pk.LoRA()], cfg=dataclasses.replace(CFG, validate=False), cache=cache, lr="val", **TINY)
    assert cache.read_text() == lines


def test_every_registered_grid_holds_its_default_rate():
    for name, cls in pk.METHODS.items():
        assert any(math.isclose(lr, cls.default_lr) for lr in cls.lr_choices()), name


def test_cli_compare_with_seeds_prints_intervals(tmp_path, capsys):
    from peftkit import cli
    code = cli.main(["compare", "--base", "tiny", "--domain", "tweets", "--methods", "head_only", "--n-train", "32",
                     "--seeds", "0,1", "--no-cross-domain", "--in-process", "--no-progress", "--threads", "1",
                     "--cache", str(tmp_path / "r.jsonl")])
    out = capsys.readouterr().out
    assert code == 0 and "mean over seeds with 95% intervals" in out and "t over 2 seeds and 420 test items" in out


_TWIN = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import peftkit as pk
from peftkit.studies.experiments import compare
from peftkit.training.loop import TrainConfig
go = Path(sys.argv[1])
Path(sys.argv[2]).touch()  # ready
while not go.exists():
    time.sleep(0.01)
df = compare([pk.LoRA(r=2, alpha=4)], base="tiny", domain="tweets", n_train=96, eval_domains=False, progress=False,
             cfg=TrainConfig(epochs=2, lr=1e-3, batch_size=8, progress=False), cache=sys.argv[3], fresh_process=False)
print(json.dumps({"cached": bool(df.cached.iloc[0]), "accuracy": float(df.accuracy.iloc[0])}))
"""


def test_two_processes_asking_for_one_run_train_it_once(tmp_path):
    """Two notebooks side by side (`peftkit run --jobs 2`, or two in JupyterLab) that need the same run: one trains
    it, the other waits at the run's lock and takes the cached row, the same numbers."""
    cache, go = tmp_path / "results.jsonl", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _TWIN, str(go), str(tmp_path / f"ready{i}"), str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT)) for i in range(2)]
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    go.touch()  # both start compare at once
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["cached"] for o in outs) == [False, True]
    assert outs[0]["accuracy"] == outs[1]["accuracy"]
    assert len(cache.read_text().splitlines()) == 1  # one row: trained once
    assert len(list((tmp_path / "adapters").iterdir())) == 1


def test_the_thread_cap_lowers_every_request_and_refuses_nonsense(monkeypatch):
    from peftkit import runtime
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    assert runtime.capped_threads(2) == 2 and runtime.capped_threads(None) is None
    monkeypatch.setenv(runtime.THREADS_ENV, "1")
    assert runtime.capped_threads(2) == 1 and runtime.capped_threads(None) == 1 and runtime.capped_threads(1) == 1
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(2) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(runtime.THREADS_ENV, bad)
        with pytest.raises(ValueError, match="PEFTKIT_THREADS"):
            runtime.thread_cap()
