"""Deployer: hot-swapped adapters on one base give each adapter's own answers, refuse bad files and
bad input with clear errors, survive threads, and round-trip through save/load without pickle."""

import json
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import peftkit as pk
from peftkit.files.adapter_file import base_items
from peftkit.serving.deployer import Deployer, UnknownAdapterError
from peftkit.studies.serving_study import swap_times
from conftest import perturb

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a wonderful, moving film", "dull and far too long", "", "not bad at all", "the plot? what plot",
         "i loved every minute of it", "meh", "an utter waste of two hours"]


def make_adapter(path, method, seed, base="tiny", base_seed=0, num_labels=2):
    model, _ = pk.load_base(base, num_labels=num_labels, seed=base_seed)
    pk.apply(model, method)
    perturb(model, seed=seed, std=0.3)  # large enough that adapters give visibly different answers
    pk.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {"lora_a": make_adapter(d / "lora_a", pk.LoRA(r=4, alpha=8), seed=1),
            "lora_b": make_adapter(d / "lora_b", pk.LoRA(r=4, alpha=8), seed=2),
            "pfeiffer": make_adapter(d / "pfeiffer", pk.Adapter(size=8), seed=3),
            "hybrid": make_adapter(d / "hybrid", pk.Hybrid(lora=pk.LoRA(r=2, alpha=4), adapter=pk.Adapter(size=4)), seed=4)}


@pytest.fixture
def dep(adapters):
    d = Deployer("tiny", device="cpu")
    for name, path in adapters.items():
        d.register(name, path)
    return d


def reference_probs(adapter_dir, texts, max_length=128):
    """What a plain model with this adapter loaded the ordinary way says, one text at a time."""
    model, tok = pk.load_base("tiny")
    pk.load_adapter(model, adapter_dir).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok([t], truncation=True, max_length=max_length, return_tensors="pt")
            out.append(torch.softmax(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits, -1)[0])
    return torch.stack(out).numpy()


def base_state(dep):
    """Every base parameter (no adapter tensor, no head) under its unwrapped name."""
    return {n: p.detach().clone() for n, p in base_items(dep.model, "classifier")}


# -- switching ------------------------------------------------------------------------------------

def test_each_adapter_answers_as_if_loaded_alone_whatever_the_switch_order(dep, adapters):
    refs = {n: reference_probs(p, TEXTS) for n, p in adapters.items()}
    for name in ["lora_a", "lora_b", "lora_a", "pfeiffer", "lora_b", "hybrid", "lora_a", "hybrid", "pfeiffer"]:
        df = dep.predict(TEXTS, adapter=name, batch_size=3)
        p = refs[name]
        np.testing.assert_allclose(df["probability"], p.max(-1), atol=1e-5)
        assert (df["label"].to_numpy() == p.argmax(-1)).all()
        assert (df["adapter"] == name).all() and dep.active == name
    assert not np.allclose(refs["lora_a"], refs["lora_b"], atol=1e-3)  # the test could tell them apart


def test_a_switch_copies_into_the_live_modules_and_never_touches_the_base(dep):
    dep.activate("lora_a")
    before = base_state(dep)
    live = {n: p.data_ptr() for n, p in dep.model.named_parameters()}
    rebuilds = dep.rebuilds
    for _ in range(5):
        dep.activate("lora_b")
        dep.activate("lora_a")
    assert dep.rebuilds == rebuilds  # same structure: no module was rebuilt ...
    assert {n: p.data_ptr() for n, p in dep.model.named_parameters()} == live  # ... nor any tensor replaced
    for n, v in base_state(dep).items():
        assert torch.equal(v, before[n]), n
    dep.activate("pfeiffer")  # another method: the live modules are rebuilt, the base still untouched
    assert dep.rebuilds == rebuilds + 1
    for n, v in base_state(dep).items():
        assert torch.equal(v, before[n]), n


def test_registered_adapters_are_cpu_copies_not_views_of_the_file(adapters, tmp_path):
    import shutil
    shutil.copytree(adapters["lora_a"], tmp_path / "a")
    d = Deployer("tiny", device="cpu")
    d.register("a", tmp_path / "a")
    want = d.predict(TEXTS, adapter="a")
    shutil.rmtree(tmp_path / "a")  # the file is gone; the registry still holds every tensor
    pd.testing.assert_frame_equal(d.predict(TEXTS, adapter="a"), want)
    assert d.adapters().loc[0, "bytes"] == sum(t.nbytes for t in d._adapters["a"].tensors) > 0


@pytest.mark.parametrize("name", ["lora_a", "hybrid"])
def test_merged_gives_the_same_outputs_as_unmerged(dep, adapters, name):
    merged = Deployer("tiny", device="cpu", merged=True)
    for n, p in adapters.items():
        merged.register(n, p)
    for other in ("lora_b", "pfeiffer", name):  # arrive at `name` through switches
        got = merged.predict(TEXTS, adapter=other)
        want = dep.predict(TEXTS, adapter=other)
        np.testing.assert_allclose(got["probability"], want["probability"], atol=1e-5)
        assert (got["label"] == want["label"]).all()
    assert all(m.merged for m in pk.core.surgery.lora_layers(merged.model))


def test_merged_switching_keeps_the_base_within_rounding(adapters):
    d = Deployer("tiny", device="cpu", merged=True)
    d.register("a", adapters["lora_a"])
    d.register("b", adapters["lora_b"])
    d.register("p", adapters["pfeiffer"])
    d.activate("a")
    d.set_merged(False)
    w0 = {n: p.detach().clone() for n, p in d.model.named_parameters() if n.endswith("base.weight")}
    d.set_merged(True)
    swap_times(d, ["a", "b"], repeats=400)  # 400 merge/unmerge round trips
    d.activate("a")
    d.set_merged(False)
    drift = max((p - w0[n]).abs().max().item() for n, p in d.model.named_parameters() if n in w0)
    assert drift < 1e-5
    assert all(not m.merged for m in pk.core.surgery.lora_layers(d.model))


def test_swap_times_and_activate(dep):
    t = swap_times(dep, ["lora_a", "lora_b"], repeats=20)
    assert t.shape == (20,) and (t > 0).all()
    switches = dep.switches
    assert dep.activate(dep.active) == 0.0 and dep.switches == switches  # already live: nothing copied
    with pytest.raises(ValueError, match="at least two"):
        swap_times(dep, ["lora_a"])


# -- bad input ------------------------------------------------------------------------------------

def test_empty_list_gives_an_empty_frame(dep):
    df = dep.predict([], adapter="lora_a")
    assert df.empty and list(df.columns) == ["text", "label", "probability", "truncated", "tokens", "unk_rate", "adapter"]


@pytest.mark.parametrize("texts, index", [(["ok", 3, "x"], 1), ([None], 0), (["a", "b", b"bytes"], 2)])
def test_a_non_string_item_names_its_index(dep, texts, index):
    with pytest.raises(TypeError, match=rf"texts\[{index}\]"):
        dep.predict(texts, adapter="lora_a")


def test_a_single_string_or_a_non_list_is_refused(dep):
    with pytest.raises(TypeError, match=r"predict\(\[text\]\)"):
        dep.predict("one text", adapter="lora_a")
    with pytest.raises(TypeError, match="list of texts"):
        dep.predict(42, adapter="lora_a")


def test_other_sequences_of_strings_are_fine(dep):
    a = dep.predict(pd.Series(TEXTS), adapter="lora_a")
    b = dep.predict(np.array(TEXTS), adapter="lora_a")
    pd.testing.assert_frame_equal(a, b)


def test_empty_string_gets_a_prediction(dep):
    df = dep.predict(["", "  "], adapter="lora_a")
    assert len(df) == 2 and (df["tokens"] == 0).all() and (df["unk_rate"] == 0).all()
    assert df["probability"].between(0.5, 1).all()


def test_long_text_is_truncated_and_flagged(dep):
    n = dep.max_length
    texts = ["good " * (n - 2), "good " * (n - 1), "good " * 1000, "short"]
    df = dep.predict(texts, adapter="lora_a")
    assert df["truncated"].tolist() == [False, True, True, False]
    assert df["tokens"].tolist() == [n - 2, n - 1, 1000, 1]
    # the truncated text is read as its first max_length tokens
    head = dep.predict(["good " * (n - 2)], adapter="lora_a")
    assert df.loc[2, "probability"] == pytest.approx(head.loc[0, "probability"], abs=1e-6)


def test_unknown_token_rate(dep):
    df = dep.predict(["plain english words", "☃ ☃ good bad"], adapter="lora_a")
    assert df.loc[0, "unk_rate"] == 0
    assert df.loc[1, "unk_rate"] == pytest.approx(0.5)


def test_unknown_adapter_lists_the_registered_ones(dep):
    with pytest.raises(KeyError) as err:
        dep.predict(["x"], adapter="tweets")
    assert isinstance(err.value, UnknownAdapterError)
    msg = str(err.value)
    assert "'tweets'" in msg and all(n in msg for n in ("lora_a", "lora_b", "pfeiffer", "hybrid"))
    fresh = Deployer("tiny", device="cpu")
    with pytest.raises(KeyError, match="none yet"):
        fresh.predict(["x"])


def test_bad_batch_size_and_settings(dep):
    with pytest.raises(ValueError, match="batch_size"):
        dep.predict(["x"], adapter="lora_a", batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        Deployer("tiny", max_length=1)
    with pytest.raises(ValueError, match="unknown base"):
        Deployer("gpt5")
    with pytest.raises(ValueError, match="label_names"):
        Deployer("tiny", label_names=["only one"])


def test_label_names(adapters):
    d = Deployer("tiny", device="cpu", label_names=("negative", "positive"))
    d.register("a", adapters["lora_a"])
    df = d.predict(TEXTS, adapter="a")
    assert (df["label_name"] == df["label"].map({0: "negative", 1: "positive"})).all()


# -- refusing files -------------------------------------------------------------------------------

def damage(path, how):
    w, j = path / "adapter.safetensors", path / "adapter.json"
    if how == "truncate":
        w.write_bytes(w.read_bytes()[:100])
    elif how == "pickle_only":
        w.unlink()
        torch.save({"x": torch.zeros(1)}, path / "adapter.bin")
    elif how == "bad_json":
        j.write_text("{oops")
    elif how == "nan":
        from safetensors.torch import load_file, save_file
        t = load_file(str(w))
        k = next(k for k in t if k.endswith("lora_B"))
        t[k] = torch.full_like(t[k], float("nan"))
        save_file(t, str(w))
        from peftkit.storage import sha256_file  # a matching checksum, so the value check is what refuses
        j.write_text(json.dumps({**json.loads(j.read_text()), "tensors_sha256": sha256_file(w)}))


@pytest.mark.parametrize("how, match", [("truncate", "truncated or corrupt"), ("pickle_only", "pickle"),
                                        ("bad_json", "not valid JSON"), ("nan", "NaN")])
def test_damaged_adapter_is_refused_and_nothing_changes(dep, adapters, tmp_path, how, match):
    import shutil
    shutil.copytree(adapters["lora_a"], tmp_path / "x")
    damage(tmp_path / "x", how)
    dep.activate("lora_b")
    before = dep.predict(TEXTS)
    with pytest.raises(pk.AdapterFileError, match=match):
        dep.register("x", tmp_path / "x")
    assert "x" not in dep.names() and dep.active == "lora_b"
    pd.testing.assert_frame_equal(dep.predict(TEXTS), before)


def test_a_pickle_file_path_is_refused_without_unpickling(dep, tmp_path, monkeypatch):
    f = tmp_path / "adapter.pt"
    torch.save({"x": torch.zeros(1)}, f)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("something unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("something called torch.load"))
    with pytest.raises(pk.AdapterFileError, match="never loaded"):
        dep.register("x", f)
    with pytest.raises(pk.AdapterFileError, match="pickle"):
        dep.register("x", tmp_path)  # a folder holding only the pickle


def test_adapters_of_another_base_are_refused(dep, tmp_path):
    make_adapter(tmp_path / "seed7", pk.LoRA(r=4, alpha=8), seed=1, base_seed=7)
    with pytest.raises(pk.AdapterFileError, match="different weights"):
        dep.register("x", tmp_path / "seed7")
    make_adapter(tmp_path / "three", pk.LoRA(r=4, alpha=8), seed=1, num_labels=3)
    with pytest.raises(pk.AdapterFileError, match="shape"):
        dep.register("x", tmp_path / "three")
    make_adapter(tmp_path / "mlp", pk.LoRA(r=4, alpha=8, targets=("fc1",)), seed=1, base="mlp")
    with pytest.raises(pk.AdapterFileError, match="different base"):
        dep.register("x", tmp_path / "mlp")
    make_adapter(tmp_path / "full", pk.FullFineTune(), seed=1)
    with pytest.raises(pk.AdapterFileError, match="full fine-tune"):
        dep.register("x", tmp_path / "full")
    assert dep.names() == ["lora_a", "lora_b", "pfeiffer", "hybrid"]


def test_names_duplicates_and_replace(dep, adapters):
    for bad in ("", "a/b", "../x", 3, "x" * 65):
        with pytest.raises(ValueError, match="adapter name"):
            dep.register(bad, adapters["lora_a"])
    with pytest.raises(ValueError, match="replace=True"):
        dep.register("lora_a", adapters["lora_b"])
    dep.activate("lora_a")
    dep.register("lora_a", adapters["lora_b"], replace=True)  # the live copy must be refreshed
    pd.testing.assert_frame_equal(dep.predict(TEXTS, adapter="lora_a").drop(columns="adapter"),
                                  dep.predict(TEXTS, adapter="lora_b").drop(columns="adapter"))
    dep.unregister("lora_b")
    with pytest.raises(KeyError, match="lora_b"):
        dep.predict(TEXTS, adapter="lora_b")


# -- threads --------------------------------------------------------------------------------------

def test_concurrent_callers_each_get_their_own_adapters_answers(dep):
    texts = [f"{t} {i}" for i in range(6) for t in TEXTS]
    names = ["lora_a", "lora_b", "pfeiffer", "hybrid"]
    want = {n: dep.predict(texts, adapter=n, batch_size=4) for n in names}
    results, errors = {n: [] for n in names}, []
    start = threading.Barrier(len(names))

    def caller(name):
        try:
            start.wait()
            for _ in range(6):
                results[name].append(dep.predict(texts, adapter=name, batch_size=4))
        except Exception as e:  # surfaced below, with the thread's adapter
            errors.append((name, e))
    switches = dep.switches
    threads = [threading.Thread(target=caller, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert dep.switches - switches > 2 * len(names)  # the calls really interleaved
    for n in names:
        for got in results[n]:
            pd.testing.assert_frame_equal(got, want[n])


# -- files ----------------------------------------------------------------------------------------

def test_save_and_load_round_trip_without_pickle(dep, tmp_path, monkeypatch):
    dep.activate("hybrid")
    dep.save(tmp_path / "dep")
    manifest = json.loads((tmp_path / "dep" / "manifest.json").read_text())
    assert manifest["active"] == "hybrid" and [a["name"] for a in manifest["adapters"]] == dep.names()
    files = sorted(p.name for p in (tmp_path / "dep").rglob("*") if p.is_file())
    assert set(files) == {"manifest.json", "adapter.json", "adapter.safetensors"}
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("something unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("something unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("something called torch.load"))
    back = Deployer.load(tmp_path / "dep", device="cpu")
    assert back.names() == dep.names() and back.active == "hybrid"
    for n in dep.names():
        pd.testing.assert_frame_equal(back.predict(TEXTS, adapter=n), dep.predict(TEXTS, adapter=n))
    dep.save(tmp_path / "dep")  # saving again over its own earlier save is fine


def test_load_refuses_bad_manifests_and_save_refuses_foreign_folders(dep, tmp_path):
    with pytest.raises(pk.AdapterFileError, match="not found"):
        Deployer.load(tmp_path / "nothing")
    dep.save(tmp_path / "d")
    m = tmp_path / "d" / "manifest.json"
    good = json.loads(m.read_text())
    m.write_text(json.dumps({**good, "format": "other"}))
    with pytest.raises(pk.AdapterFileError, match="not a peftkit deployment"):
        Deployer.load(tmp_path / "d")
    m.write_text(json.dumps({k: v for k, v in good.items() if k != "adapters"}))
    with pytest.raises(pk.AdapterFileError, match="adapters"):
        Deployer.load(tmp_path / "d")
    m.write_text(json.dumps({**good, "adapters": [{"name": "x", "folder": "../../etc"}]}))
    with pytest.raises(pk.AdapterFileError, match="outside"):
        Deployer.load(tmp_path / "d")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        dep.save(tmp_path / "foreign")


# -- the real base, and the benchmark ---------------------------------------------------------------

@pytest.mark.minilm
def test_minilm_lora_switch_matches_load_adapter(tmp_path):
    for i, name in enumerate(["m", "t"]):
        make_adapter(tmp_path / name, pk.LoRA(r=8, alpha=16), seed=i + 1, base="minilm")
    d = Deployer("minilm", device="cpu")
    d.register("m", tmp_path / "m")
    d.register("t", tmp_path / "t")
    texts = TEXTS[:4]
    d.activate("m")
    before = base_state(d)
    got = d.predict(texts, adapter="t")
    model, tok = pk.load_base("minilm")
    pk.load_adapter(model, tmp_path / "t").eval()
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        want = torch.softmax(model(**enc).logits, -1).numpy()
    np.testing.assert_allclose(got["probability"], want.max(-1), atol=1e-5)
    for n, v in base_state(d).items():
        assert torch.equal(v, before[n]), n
    assert d.adapters()["bytes"].max() < 0.01 * sum(p.numel() * 4 for p in model.parameters())


def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    df = pd.read_csv(out)
    assert {"unmerged", "merged"} <= set(df["mode"])
    assert (df["switch_ms_median"] > 0).all() and (df["adapters_pct_of_base_rss"] >= 0).all()
    assert "switch" in p.stdout


def test_serve_stream_records_every_request_and_stops_on_an_alert(dep):
    from peftkit.serving.monitor import Monitor
    from peftkit.studies.serving_study import serve_stream
    texts = [f"{t} {i}" for i in range(8) for t in TEXTS]  # 64 texts
    answers = dep.predict(texts, adapter="lora_a")["label"].to_numpy()
    wrong = 1 - answers  # every label disagrees: accuracy 0
    mon = Monitor(window=20, min_accuracy=0.5, min_labeled=10, drift_test="ks")
    served, alerts = serve_stream(dep, mon, texts, wrong, "lora_a", batch=5, stop_on="degradation")
    assert len(served) == 10 and mon.seen == 10  # the second request fills min_labeled and fires
    assert [a["kind"] for a in alerts] == ["degradation"] and not served["correct"].any()
    assert served["n"].tolist() == [5] * 5 + [10] * 5
    full, _ = serve_stream(dep, Monitor(window=20, drift_test="ks"), texts, answers, "lora_b", batch=7)
    assert len(full) == 64 and (full["adapter"] == "lora_b").all()
    with pytest.raises(ValueError, match="one label per text"):
        serve_stream(dep, mon, texts, wrong[:3], "lora_a")
    with pytest.raises(ValueError, match="stop_on"):
        serve_stream(dep, mon, texts, wrong, "lora_a", stop_on="error")


def test_an_adapter_saved_without_a_head_gets_the_bases_own_head_back(adapters, tmp_path):
    model, _ = pk.load_base("tiny")
    pk.apply(model, pk.LoRA(r=4, alpha=8), head=None)  # the head stays frozen and is not saved
    perturb(model, seed=5, std=0.3)
    pk.save_adapter(model, tmp_path / "headless")
    d = Deployer("tiny", device="cpu")
    d.register("with_head", adapters["lora_a"])
    d.register("headless", tmp_path / "headless")
    d.predict(TEXTS, adapter="with_head")  # writes lora_a's trained head into the live model
    got = d.predict(TEXTS, adapter="headless")
    np.testing.assert_allclose(got["probability"], reference_probs(tmp_path / "headless", TEXTS).max(-1), atol=1e-5)
