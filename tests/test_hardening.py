"""The adversarial findings of issue 21, each held by a test: nothing peftkit reads poisons the
model, hangs the process, or loses what was there.

Every refusal is checked with a snapshot: all parameters, every requires_grad flag and the
module tree are as they were."""

import json
import os
import random
import shutil
import struct
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

import peftkit as pk
from peftkit import storage
from peftkit.core.targets import regex_risk
from peftkit.data.loaders import EpochBatchSampler
from peftkit.files.adapter_file import CONFIG, WEIGHTS
from peftkit.serving.deployer import Deployer
from peftkit.serving.monitor import Monitor, read_export
from peftkit.studies import experiments as E
from peftkit.training import checkpoint as ckpt
from peftkit.training.loop import ResumeMismatch, TrainConfig, fit
from conftest import fresh, logits, make_inputs, perturb

MLP_LORA = pk.LoRA(r=4, alpha=8, targets=("fc1", "fc2"))
TEXTS = ["a wonderful, moving film", "dull and far too long", "", "not bad at all"]


# -- helpers ----------------------------------------------------------------------------------------

def snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()])


def assert_untouched(model, snap):
    values, grads, kinds = snap
    now = snapshot(model)
    assert now[2] == kinds and now[1] == grads
    for n, v in values.items():
        assert torch.equal(now[0][n], v), n
    assert not hasattr(model, "peftkit")


def saved_adapter(path, base="mlp", method=MLP_LORA, seed=1):
    model = perturb(pk.apply(fresh(base), method), seed=seed)
    pk.save_adapter(model, path)
    return model


def rewrite(folder, tensors=None, raw=None, **meta_changes):
    """Replace an adapter's tensors (a dict, or raw bytes) and fix its checksum: what an attacker
    (or a careful corrupter) would do, so that the checks behind the checksum are exercised."""
    folder = Path(folder)
    if tensors is not None:
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    if raw is not None:
        (folder / WEIGHTS).write_bytes(raw)
    meta = json.loads((folder / CONFIG).read_text())
    meta.update(meta_changes)
    meta["tensors_sha256"] = storage.sha256_file(folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(meta))


def header_of(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def with_header(raw: bytes, header: dict) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:]


def refused_untouched(path, base="mlp", match=None):
    target = fresh(base)
    snap = snapshot(target)
    with pytest.raises(pk.AdapterFileError, match=match):
        pk.load_adapter(target, path)
    assert_untouched(target, snap)


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = tmp_path_factory.mktemp("dep")
    for name, seed in (("a", 1), ("b", 2)):
        saved_adapter(d / name, base="tiny", method=pk.LoRA(r=4, alpha=8), seed=seed)
    out = Deployer("tiny", device="cpu")
    out.register("a", d / "a")
    out.register("b", d / "b")
    return out, d


def register_refused(dep_and_dir, folder, match):
    dep, _ = dep_and_dir
    dep.activate("a")
    before = dep.predict(TEXTS)
    with pytest.raises(pk.AdapterFileError, match=match):
        dep.register("x", folder)
    assert "x" not in dep.names() and dep.active == "a"
    pd.testing.assert_frame_equal(dep.predict(TEXTS), before)


# -- corrupt values never poison the model ----------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused_by_load_adapter(bad, tmp_path):
    saved_adapter(tmp_path)
    t = load_file(str(tmp_path / WEIGHTS))
    k = next(k for k in t if k.endswith("lora_B"))
    t[k][0, 0] = bad
    rewrite(tmp_path, t)
    refused_untouched(tmp_path, match="NaN or inf")


def test_a_flipped_exponent_bit_is_refused_by_checksum_and_by_magnitude(dep, tmp_path):
    saved_adapter(tmp_path / "x", base="tiny", method=pk.LoRA(r=4, alpha=8))
    raw = bytearray((tmp_path / "x" / WEIGHTS).read_bytes())
    n, header = header_of(bytes(raw))
    name = next(k for k in header if k.endswith("lora_A"))
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start + 3] ^= 0x40  # the top exponent bit of the first float32: 0.1 becomes ~3.4e37
    (tmp_path / "x" / WEIGHTS).write_bytes(bytes(raw))
    register_refused(dep, tmp_path / "x", "SHA-256")
    refused_untouched(tmp_path / "x", base="tiny", match="SHA-256")
    rewrite(tmp_path / "x")  # the checksum now agrees: the value check must catch it
    assert abs(load_file(str(tmp_path / "x" / WEIGHTS))[name].flatten()[0]) > 1e30
    register_refused(dep, tmp_path / "x", "beyond")
    refused_untouched(tmp_path / "x", base="tiny", match="beyond")


def test_a_float_tensor_declared_as_int32_is_refused_by_both(dep, tmp_path):
    saved_adapter(tmp_path / "x", base="tiny", method=pk.LoRA(r=4, alpha=8))
    raw = (tmp_path / "x" / WEIGHTS).read_bytes()
    _, header = header_of(raw)
    name = next(k for k in header if k.endswith("lora_A"))
    header[name]["dtype"] = "I32"
    rewrite(tmp_path / "x", raw=with_header(raw, header))
    assert load_file(str(tmp_path / "x" / WEIGHTS))[name].dtype == torch.int32
    register_refused(dep, tmp_path / "x", "not a floating-point type")
    refused_untouched(tmp_path / "x", base="tiny", match="not a floating-point type")


@pytest.mark.parametrize("where", ["header", "data", "last byte"])
def test_a_flipped_bit_anywhere_is_refused_with_a_clear_message(where, tmp_path):
    saved_adapter(tmp_path)
    raw = bytearray((tmp_path / WEIGHTS).read_bytes())
    n, _ = header_of(bytes(raw))
    i = {"header": 8 + n // 2, "data": 8 + n + 5, "last byte": len(raw) - 1}[where]
    raw[i] ^= 0x01
    (tmp_path / WEIGHTS).write_bytes(bytes(raw))
    refused_untouched(tmp_path, match="does not match the SHA-256 recorded in .*save the adapter again")


def test_files_saved_before_checksums_still_load_with_a_warning(tmp_path):
    model = saved_adapter(tmp_path)
    meta = json.loads((tmp_path / CONFIG).read_text())
    assert storage.is_sha256(meta.pop("tensors_sha256"))
    (tmp_path / CONFIG).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no SHA-256"):
        restored = pk.load_adapter(fresh("mlp"), tmp_path)
    x = make_inputs("mlp")
    with torch.no_grad():
        torch.testing.assert_close(logits(restored, x), logits(model.eval(), x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("change", [
    {"method": ["lora"]}, {"method": {"method": ["lora"]}}, {"method": {"method": "lora", "r": "8"}},
    {"method": {"method": "hybrid", "lora": {"method": "hybrid"}}}, {"head": 3}, {"head": ""}, {"base": [1]},
    {"tensors_sha256": 5}, {"method": {"method": "lora", "targets": [1, None]}}, "deep", "list", "utf8",
])
def test_parsing_errors_are_adapter_file_errors_never_builtin_exceptions(change, tmp_path):
    saved_adapter(tmp_path)
    if change == "deep":
        (tmp_path / CONFIG).write_text("[" * 100_000)  # RecursionError inside json
    elif change == "list":
        (tmp_path / CONFIG).write_text("[]")
    elif change == "utf8":
        (tmp_path / CONFIG).write_bytes(b'{"format": "\xff\xfe"}')
    else:
        meta = json.loads((tmp_path / CONFIG).read_text())
        (tmp_path / CONFIG).write_text(json.dumps({**meta, **change}))
    refused_untouched(tmp_path)


def test_shapes_must_match_exactly_never_broadcast(tmp_path):
    saved_adapter(tmp_path)
    t = load_file(str(tmp_path / WEIGHTS))
    k = next(k for k in t if k.endswith("lora_A"))
    t[k] = t[k][:1].clone()  # (1, in) where (4, in) belongs: copy_ would broadcast it
    rewrite(tmp_path, t)
    refused_untouched(tmp_path, match=r"has shape \(1, 16\), the model expects \(4, 16\)")


@pytest.mark.timeout(60)  # a hang guard, not a speed test: the check is that nothing is allocated
@pytest.mark.parametrize("r", [2**40, 2**23])
def test_an_absurd_rank_is_refused_before_any_allocation_and_changes_nothing(r, tmp_path):
    saved_adapter(tmp_path, base="tiny", method=pk.LoRA(r=4, alpha=8))
    meta = json.loads((tmp_path / CONFIG).read_text())
    rewrite(tmp_path, method={**meta["method"], "r": r})
    target = fresh("tiny")
    snap = snapshot(target)
    from peftkit.runtime import current_rss_mib, peak_memory_mib
    before = current_rss_mib()
    with pytest.raises(pk.AdapterFileError, match="shape"):
        pk.load_adapter(target, tmp_path)
    assert peak_memory_mib("cpu") < before + 512  # r = 2**23 would take 1 GiB for one lora_A of the tiny BERT
    assert_untouched(target, snap)  # before the fix the first query layer was left frozen and wrapped


def test_a_failure_while_applying_restores_every_flag(tmp_path, monkeypatch):
    saved_adapter(tmp_path)
    import peftkit.files.adapter_file as af
    real = af.apply

    def half_then_fail(model, method, head="auto"):
        real(model, method, head)
        if not next(model.parameters()).is_meta:  # the check on the skeleton passes; the real apply fails
            raise MemoryError("simulated: out of memory half-way")
    monkeypatch.setattr(af, "apply", half_then_fail)
    target = fresh("mlp")
    target.fc1.weight.requires_grad_(False)  # a flag that apply would change
    snap = snapshot(target)
    with pytest.raises(MemoryError):
        pk.load_adapter(target, tmp_path)
    assert_untouched(target, snap)


# -- a crafted file never hangs the process ---------------------------------------------------------

BOMBS = ["([a-z0-9.]+)+Z", "(a|ab)+$", "(.*a){20}", r"(\w+\s?)+$", r"(.)\1+", ".*.*.*.*.*Z", "(a?){30}a{30}",
         "x" * 300]


@pytest.mark.timeout(60)  # matching any of these against module names would backtrack for far longer
@pytest.mark.parametrize("pattern", BOMBS)
def test_a_catastrophic_regex_target_is_refused_at_once(pattern, dep, tmp_path):
    assert regex_risk(pattern)
    saved_adapter(tmp_path / "x", base="tiny", method=pk.LoRA(r=4, alpha=8))
    meta = json.loads((tmp_path / "x" / CONFIG).read_text())
    rewrite(tmp_path / "x", method={**meta["method"], "targets": [pattern]})
    refused_untouched(tmp_path / "x", base="tiny", match="refused as a regex")
    register_refused(dep, tmp_path / "x", "refused as a regex")
    with pytest.raises(pk.TargetError, match="exponential"):
        pk.apply(fresh("tiny"), pk.LoRA(targets=(pattern,)))


@pytest.mark.parametrize("pattern", ["query", "attention.self.query", r".*layer\.[0-1]\..*\.query",
                                     r".*\.(query|value)", r"bert\.encoder\.layer\.\d+\.attention\.self\.value"])
def test_ordinary_targets_and_regexes_still_match(pattern):
    assert regex_risk(pattern) is None
    model = pk.apply(fresh("tiny"), pk.LoRA(r=2, alpha=4, targets=(pattern,)))
    assert pk.core.surgery.lora_layers(model)


# -- atomic folders ------------------------------------------------------------------------------------

def test_an_interrupted_save_adapter_leaves_the_old_adapter_whole(tmp_path, monkeypatch):
    old = saved_adapter(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    import peftkit.files.adapter_file as af

    def crash(*a, **k):  # the tensors are written, the JSON is not: the old bug's mixed folder
        raise OSError("disk full")
    monkeypatch.setattr(af, "write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        pk.save_adapter(perturb(old, seed=9), tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left behind
    monkeypatch.undo()
    pk.load_adapter(fresh("mlp"), tmp_path / "a")


def test_save_adapter_never_writes_through_a_symlink_and_never_deletes_foreign_files(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    model = saved_adapter(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS).unlink()
    (tmp_path / "a" / WEIGHTS).symlink_to(outside)
    pk.save_adapter(model, tmp_path / "a")
    assert outside.read_bytes() == b"precious" and not (tmp_path / "a" / WEIGHTS).is_symlink()
    pk.load_adapter(fresh("mlp"), tmp_path / "a")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no adapter.json"):
        pk.save_adapter(model, tmp_path / "mine")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(FileExistsError, match="symbolic link"):
        pk.save_adapter(model, tmp_path / "link")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_deployer_save_never_writes_through_a_symlink_planted_in_an_earlier_save(dep, tmp_path):
    d, _ = dep
    d.save(tmp_path / "dep")
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = tmp_path / "dep" / "adapters" / "a"
    shutil.rmtree(planted)
    planted.symlink_to(outside)
    d.save(tmp_path / "dep")
    assert list(outside.iterdir()) == []  # before the fix the adapter's files landed here
    assert not planted.is_symlink() and (planted / CONFIG).is_file()
    back = Deployer.load(tmp_path / "dep", device="cpu")
    pd.testing.assert_frame_equal(back.predict(TEXTS, adapter="a"), d.predict(TEXTS, adapter="a"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_folder_keeps_the_old_folder_on_error_and_swaps_whole(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with storage.atomic_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash mid-write")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with storage.atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


# -- append-only logs survive tears --------------------------------------------------------------------

def test_a_row_appended_after_a_torn_line_is_not_lost(tmp_path):
    cache = tmp_path / "results.jsonl"
    cache.write_bytes(b'{"key": "a", "label": "x"}\n{"key": "b", "acc')  # a writer killed mid-line
    E.append_cache({"key": "c", "label": "y"}, cache)
    with pytest.warns(UserWarning, match="skipped 1 line"):
        rows = E.read_cache(cache)
    assert list(rows) == ["a", "c"]


@pytest.mark.parametrize("bad", [b"null", b"[1, 2]", b"42", b'"text"', b"\xff\xfe{not utf-8}", b"{\"key\": 3}",
                                 b"[" * 5000, b'{"no_key": 1}'])
def test_a_malformed_cache_line_is_skipped_and_counted_and_compare_still_works(bad, tmp_path):
    method = pk.HeadOnly()
    cfg = TrainConfig(lr=1e-3, progress=False)
    key = E.config_key(E.make_spec(method, "tiny", "movies", 64, cfg, 128, False, None))
    cache = tmp_path / "results.jsonl"
    cache.write_bytes(bad + b"\n" + json.dumps({"key": key, "label": "head only", "method": "head_only",
                                                "accuracy": 0.5}).encode() + b"\n" + bad)
    with pytest.warns(UserWarning, match="skipped 2 line"):
        df = E.compare([method], base="tiny", n_train=64, cfg=cfg, eval_domains=False, cache=cache, progress=False)
    assert df.cached.tolist() == [True] and df.accuracy.tolist() == [0.5]  # from the cache: nothing retrained


def test_monitor_export_after_a_torn_line_loses_nothing_and_counts_the_tear(tmp_path):
    path = tmp_path / "monitor.jsonl"
    mon = Monitor(window=200)
    mon.record(["a b"] * 4, [1, 0, 1, 1], [0.9, 0.8, 0.7, 0.6], labels=[1, 0, 0, 1])
    n = mon.export(path)
    path.write_bytes(path.read_bytes() + b'{"type": "metr')  # another writer killed mid-line
    mon.note("after the tear")
    assert mon.export(path) == 1
    with pytest.warns(UserWarning, match="skipped 1 line"):
        df = read_export(path)
    assert len(df) == n + 1 and df.attrs["skipped_lines"] == 1 and df.note.iloc[-1] == "after the tear"


def test_the_default_cache_and_optuna_storage_are_relative_to_the_working_directory(monkeypatch, tmp_path):
    from peftkit.studies import tuning
    if os.environ.get(storage.RUNS_ENV):
        pytest.skip("PEFTKIT_RUNS is set for this run")
    assert E.DEFAULT_CACHE == Path("runs") / "results.jsonl"
    assert tuning.DEFAULT_STORAGE == "sqlite:///runs/optuna.db"
    monkeypatch.chdir(tmp_path)
    E.append_cache({"key": "k"})
    assert (tmp_path / "runs" / "results.jsonl").is_file() and list(E.read_cache()) == ["k"]
    monkeypatch.setenv(storage.RUNS_ENV, str(tmp_path / "elsewhere"))
    assert storage.runs_dir() == tmp_path / "elsewhere"


# -- import_peft ---------------------------------------------------------------------------------------

def test_import_peft_checks_its_checksum_and_refuses_missing_modules_to_save_tensors(tmp_path):
    pk.export_peft(perturb(pk.apply(fresh("tiny"), pk.LoRA(r=4, alpha=8))), tmp_path)
    w = tmp_path / "adapter_model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0x01  # export_peft records the checksum beside PEFT's files
    w.write_bytes(bytes(raw))
    with pytest.raises(pk.AdapterFileError, match="SHA-256 .* delete peftkit_base.json"):
        pk.import_peft(fresh("tiny"), tmp_path)
    (tmp_path / "peftkit_base.json").unlink()  # as PEFT itself writes the folder
    t = load_file(str(w))
    save_file({k: v for k, v in t.items() if "classifier" not in k}, str(w))
    target = fresh("tiny")
    snap = snapshot(target)
    with pytest.raises(pk.AdapterFileError, match=r"\['classifier'\] in modules_to_save.*random"):
        pk.import_peft(target, tmp_path)
    assert_untouched(target, snap)


def test_import_peft_refuses_a_detectably_different_base_and_reports_what_it_loaded(tmp_path, capsys):
    model = perturb(pk.apply(fresh("tiny"), pk.LoRA(r=4, alpha=8)))
    pk.export_peft(model, tmp_path)
    other = fresh("tiny", seed=7)  # same shapes, different weights: only the fingerprint tells
    snap = snapshot(other)
    with pytest.raises(pk.AdapterFileError, match="different weights"):
        pk.import_peft(other, tmp_path)
    assert_untouched(other, snap)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "peftkit_base.json").unlink()  # a PEFT-made folder has no fingerprint: the name still tells
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "bert-base-uncased"}))
    with pytest.raises(pk.AdapterFileError, match="made for base 'bert-base-uncased'"):
        pk.import_peft(fresh("tiny"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    ours = pk.import_peft(fresh("tiny"), tmp_path)
    line = capsys.readouterr().out.strip()
    assert "LoRA r=4 alpha=8 on 4 layers (query, value)" in line and "'classifier' from modules_to_save" in line
    x = make_inputs("tiny")
    with torch.no_grad():
        torch.testing.assert_close(logits(ours.eval(), x), logits(model.eval(), x), atol=1e-6, rtol=0)


# -- resume compares configurations --------------------------------------------------------------------

class _Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 16, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _collate(items):
    return {"x": torch.stack([a for a, _ in items]), "labels": torch.stack([b for _, b in items])}


def mlp_loader(n=48, batch_size=8, seed=0):
    ds = _Rows(n, seed)
    return DataLoader(ds, batch_sampler=EpochBatchSampler([1] * n, batch_size, seed=seed), collate_fn=_collate)


def mlp_run(tmp_path, **changes):
    model = pk.apply(fresh("mlp"), MLP_LORA)
    kw = dict(epochs=2, lr=1e-2, batch_size=8, checkpoint_dir=str(tmp_path / "ck"), progress=False, seed=0,
              max_steps=4) | changes
    return model, TrainConfig(**kw)


def test_resume_refuses_a_changed_configuration_naming_each_field_and_force_warns(tmp_path):
    model, cfg = mlp_run(tmp_path)
    fit(model, mlp_loader(), None, cfg)  # stops at step 4 of 12, with a checkpoint
    for changes, loader, named in [
        ({"batch_size": 16}, mlp_loader(batch_size=16), ["config.batch_size", "data.batch_size", "data.batches_per_epoch"]),
        ({"epochs": 3}, mlp_loader(), ["config.epochs is 2 in the checkpoint, 3 now"]),
        ({"lr": 5e-3, "seed": 1}, mlp_loader(), ["config.lr", "config.seed"]),
        ({}, mlp_loader(n=40), ["data.train_examples"]),
    ]:
        fresh_model, new_cfg = mlp_run(tmp_path, **changes)
        snap = snapshot(fresh_model)
        with pytest.raises(ResumeMismatch) as err:
            fit(fresh_model, loader, None, new_cfg, resume=True)
        for field in named:
            assert field in str(err.value), (field, str(err.value))
        assert "resume='force'" in str(err.value)
        values, grads, kinds = snap
        assert all(torch.equal(p, values[n]) for n, p in fresh_model.named_parameters())
    other = pk.apply(fresh("mlp"), pk.LoRA(r=2, alpha=4, targets=("fc1", "fc2")))
    with pytest.raises(ResumeMismatch, match="method.r is 4 in the checkpoint, 2 now.*trainable parameters"):
        fit(other, mlp_loader(), None, mlp_run(tmp_path)[1], resume=True)
    forced, cfg2 = mlp_run(tmp_path, lr=5e-3)
    with pytest.warns(UserWarning, match="config.lr"):
        fit(forced, mlp_loader(), None, cfg2, resume="force")
    same, cfg3 = mlp_run(tmp_path, max_steps=6)
    with pytest.raises(ResumeMismatch, match="config.max_steps"):
        fit(same, mlp_loader(), None, cfg3, resume=True)


def test_resume_refuses_a_tampered_checkpoint_before_changing_anything(tmp_path):
    model, cfg = mlp_run(tmp_path)
    fit(model, mlp_loader(), None, cfg)
    path = ckpt.latest(cfg.checkpoint_dir)
    t = load_file(str(path / "state.safetensors"))
    k = next(k for k in t if k.startswith("param/") and k.endswith("lora_A"))
    t[k] = t[k][:1].clone()  # (1, 16) where (4, 16) belongs: copy_ broadcast it before the fix
    save_file(t, str(path / "state.safetensors"))
    again, _ = mlp_run(tmp_path)
    snap = snapshot(again)
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        fit(again, mlp_loader(), None, cfg, resume=True)
    js = json.loads((path / "state.json").read_text())
    js["sha256"] = storage.sha256_file(path / "state.safetensors")
    (path / "state.json").write_text(json.dumps(js))
    with pytest.raises(ckpt.CheckpointError, match=r"has shape \(1, 16\), this run expects \(4, 16\)"):
        fit(again, mlp_loader(), None, cfg, resume=True)
    values, grads, _ = snap
    assert all(torch.equal(p, values[n]) for n, p in again.named_parameters())
    assert {n: p.requires_grad for n, p in again.named_parameters()} == grads


def test_resume_with_the_same_configuration_still_continues_exactly(tmp_path, monkeypatch):
    ref, cfg = mlp_run(tmp_path / "ref", max_steps=None)
    fit(ref, mlp_loader(), None, cfg)
    part, cfg_part = mlp_run(tmp_path / "part", max_steps=None)
    real = ckpt.save

    def save_then_crash(*a, **k):  # the first end-of-epoch checkpoint is written, then the run dies
        real(*a, **k)
        raise RuntimeError("stop")
    monkeypatch.setattr(ckpt, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="stop"):
        fit(part, mlp_loader(), None, cfg_part)
    monkeypatch.undo()
    rest, _ = mlp_run(tmp_path / "part", max_steps=None)
    fit(rest, mlp_loader(), None, cfg_part, resume=True)
    for (n, a), b in zip(ref.named_parameters(), rest.parameters()):
        assert torch.equal(a, b), n


# -- the command line: one line and exit code 2, before any work -------------------------------------

@pytest.mark.parametrize("args,match", [
    (["train", "--lr", "0"], "--lr: 0 is out of range"),
    (["train", "--lr=-1e-3"], "out of range"),
    (["train", "--lr", "nan"], "out of range"),
    (["train", "--threads=-2"], "--threads: -2 is out of range"),
    (["train", "--threads", "0"], "out of range"),
    (["train", "--epochs", "0"], "out of range"),
    (["train", "--base", "mlp", "--method", "head_only"], "invalid choice: 'mlp'"),
    (["train", "--base", "tiny", "--method", "lora", "--targets", "fc1"], "unknown lora target 'fc1'"),
    (["train", "--base", "tiny", "--method", "lora", "--targets", "([a-z]+)+Z"], "refused as a regex"),
    (["train", "--base", "tiny", "--domain", "reddit"], "unknown domain"),
    (["train", "--out", "FILE"], "already exists (a file)"),
    (["train", "--out", "FULL"], "already exists (a folder that is not empty)"),
    (["compare", "--base", "tiny", "--methods", "lora", "--targets", "fc1"], "unknown lora target"),
    (["demo", "--threads=-2"], "out of range"),
])
def test_cli_user_errors_give_one_line_and_exit_2_before_any_work(args, match, tmp_path, capsys, monkeypatch):
    from peftkit import cli
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "x").write_text("x")
    args = [str(tmp_path / a) if a in ("FILE", "FULL") else a for a in args]
    if args[0] == "train" and "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(cli, "compare", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(cli, "_demo", lambda *a, **k: pytest.fail("the demo started"))
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert match.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "new").exists()


# -- fuzz: mutated files end in a clean refusal or a finite load, quickly -----------------------------

def _mutate_json(rng, obj, depth=0):
    """A random change somewhere in a JSON value."""
    junk = [None, True, 0, -1, 2**40, 1e308, float("nan"), "", "x" * 50, [], {}, [1, "a"], {"method": "lora"},
            "([a-z0-9.]+)+Z", ["([a-z0-9.]+)+Z"], {"method": "hybrid", "lora": {"method": "hybrid"}}, "fc1", ["fc9"]]
    if isinstance(obj, dict) and obj and depth < 4 and rng.random() < 0.7:
        k = rng.choice(list(obj))
        r = rng.random()
        if r < 0.15:
            return {kk: v for kk, v in obj.items() if kk != k}
        if r < 0.25:
            return {**obj, f"extra{rng.randint(0, 9)}": rng.choice(junk)}
        return {**obj, k: _mutate_json(rng, obj[k], depth + 1)}
    if isinstance(obj, list) and obj and rng.random() < 0.5:
        i = rng.randrange(len(obj))
        return obj[:i] + [_mutate_json(rng, obj[i], depth + 1)] + obj[i + 1:]
    return rng.choice(junk)


def _mutate_bytes(rng, raw: bytes) -> bytes:
    b = bytearray(raw)
    r = rng.random()
    if r < 0.4:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif r < 0.6:
        b = b[:rng.randrange(len(b))]
    elif r < 0.8:  # the header's length field or the header itself
        i = rng.randrange(min(len(b), 8 + header_of(raw)[0]))
        b[i] = rng.randrange(256)
    else:
        n, header = header_of(raw)
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice({"dtype": ["I32", "F16", "BF16", "F64", "U8", "BOOL", "XX"],
                                          "shape": [[1, 16], [4], [], [2**40, 0], [-1, 16], [16, 4]],
                                          "data_offsets": [[0, 4], [0, 2**62], [-8, 0]]}[field])
        text = json.dumps(header).encode()
        b = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return bytes(b)


@pytest.mark.timeout(120)  # all 600 cases take about a second: a case that hangs fails the test here
def test_fuzz_mutated_adapter_files_end_in_a_refusal_or_a_finite_load(tmp_path):
    """500 peftkit adapters and 100 PEFT folders, mutated at random (seeded): every case ends in
    AdapterFileError or a load whose outputs are finite, and none hangs (the test's timeout)."""
    rng = random.Random(21)
    good = tmp_path / "good"
    saved_adapter(good, method=pk.Hybrid(lora=pk.LoRA(r=2, alpha=4, targets=("fc1",)),
                                         adapter=pk.Adapter(size=4, targets=("fc2",))))
    peft_good = tmp_path / "peft"
    pk.export_peft(perturb(pk.apply(fresh("mlp"), MLP_LORA)), peft_good)
    x = make_inputs("mlp")
    outcomes = {"refused": 0, "loaded": 0}
    warnings.simplefilter("ignore")
    for case in range(600):
        peft_case = case >= 500
        src = peft_good if peft_case else good
        conf, weights = ("adapter_config.json", "adapter_model.safetensors") if peft_case else (CONFIG, WEIGHTS)
        d = tmp_path / f"case{case % 2}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        what = rng.random()
        if what < 0.45:
            (d / conf).write_text(json.dumps(_mutate_json(rng, json.loads((src / conf).read_text()))))
        elif what < 0.9:
            (d / weights).write_bytes(_mutate_bytes(rng, (src / weights).read_bytes()))
            if not peft_case and rng.random() < 0.7:  # a matching checksum lets the mutation reach the parser
                meta = json.loads((d / conf).read_text())
                (d / conf).write_text(json.dumps({**meta, "tensors_sha256": storage.sha256_file(d / weights)}))
        else:
            raw = (src / conf).read_bytes()
            (d / conf).write_bytes(raw[:rng.randrange(len(raw))] if rng.random() < 0.5 else b"[" * 100_000)
        model = fresh("mlp")
        snap = snapshot(model)
        try:
            (pk.import_peft(model, d, verbose=False) if peft_case else pk.load_adapter(model, d))
        except pk.AdapterFileError:
            outcomes["refused"] += 1
            assert_untouched(model, snap)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"case {case}: {type(e).__name__}: {e}")
        else:
            outcomes["loaded"] += 1
            with torch.no_grad():
                assert torch.isfinite(logits(model.eval(), x)).all(), case
    assert outcomes["refused"] > 300 and outcomes["loaded"] > 20, outcomes
