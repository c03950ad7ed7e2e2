"""Adapter files: only adapter and head tensors, exact round trips, and refusals that lose nothing."""

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit as pk
from peftkit.layers.names import is_adapter_param
from conftest import METHOD_KEYS, MODELS, clone, fresh, logits, make_inputs, make_method, perturb


def trained(key, base):
    model = pk.apply(fresh(base), make_method(key, base))
    return perturb(model).eval()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, \
        {n: p.requires_grad for n, p in model.named_parameters()}, \
        [type(m).__name__ for m in model.modules()]


def assert_untouched(model, snap):
    values, grads, kinds = snap
    now = snapshot(model)
    assert now[2] == kinds
    assert now[1] == grads
    for n, v in values.items():
        assert torch.equal(now[0][n], v), n


@pytest.mark.parametrize("base", MODELS)
@pytest.mark.parametrize("key", METHOD_KEYS)
def test_save_then_load_gives_same_outputs(key, base, tmp_path):
    model = trained(key, base)
    pk.save_adapter(model, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter.safetensors")))
    if key == "full":
        assert len(keys) == len(list(model.parameters()))
    else:
        assert keys and all(is_adapter_param(k) or k.startswith("classifier.") for k in keys)
        assert not any(".base." in k for k in keys)
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["method"] == make_method(key, base).to_dict() and meta["peftkit_version"] == pk.__version__
    restored = pk.load_adapter(fresh(base), tmp_path / "a").eval()
    x = make_inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(logits(restored, x), logits(model, x), atol=1e-6, rtol=0)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    model = trained("lora", "tiny")
    pk.save_adapter(model, tmp_path)
    good = (tmp_path / "adapter.safetensors").read_bytes()
    import peftkit.files.safe_io as pio  # where write_tensors calls save_file

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pio, "save_file", boom)
    with pytest.raises(OSError):
        pk.save_adapter(perturb(model, seed=5), tmp_path)
    assert (tmp_path / "adapter.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_merged_model_saves_the_same_adapter(tmp_path):
    model = trained("lora", "tiny")
    pk.save_adapter(model, tmp_path / "u")
    pk.merge(model)
    pk.save_adapter(model, tmp_path / "m")
    assert (tmp_path / "u" / "adapter.safetensors").read_bytes() == (tmp_path / "m" / "adapter.safetensors").read_bytes()
    assert pk.load_adapter(fresh("tiny"), tmp_path / "m") is not None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_weights", "missing_json", "bad_json",
                                    "pickle_only", "wrong_shape", "wrong_keys", "not_peftkit"])
def test_damaged_files_are_refused_and_the_model_is_untouched(damage, tmp_path):
    model = trained("hybrid", "tiny")
    pk.save_adapter(model, tmp_path)
    w, j = tmp_path / "adapter.safetensors", tmp_path / "adapter.json"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:200])
    elif damage == "garbage":
        w.write_bytes(b"\x00" * 64)
    elif damage == "missing_weights":
        w.unlink()
    elif damage == "missing_json":
        j.unlink()
    elif damage == "bad_json":
        j.write_text("{not json")
    elif damage == "pickle_only":
        w.unlink()
        torch.save({"x": torch.zeros(1)}, tmp_path / "adapter.bin")
    elif damage == "wrong_shape" or damage == "wrong_keys":
        from safetensors.torch import save_file
        t = load_file(str(w))
        k = next(k for k in t if k.endswith("lora_A"))
        if damage == "wrong_shape":
            t[k] = torch.zeros(3, 3)
        else:
            t[k.replace("lora_A", "lora_C")] = t.pop(k)
        save_file(t, str(w))
    elif damage == "not_peftkit":
        j.write_text(json.dumps({"format": "something-else"}))
    target = fresh("tiny")
    snap = snapshot(target)
    with pytest.raises(pk.AdapterFileError) as err:
        pk.load_adapter(target, tmp_path)
    assert str(tmp_path) in str(err.value) or "adapter" in str(err.value)
    if damage == "pickle_only":
        assert "pickle" in str(err.value)
    assert_untouched(target, snap)
    assert not hasattr(target, "peftkit")


def test_mismatched_base_is_refused(tmp_path):
    pk.save_adapter(trained("lora", "tiny"), tmp_path)
    other = fresh("tiny", seed=7)  # same architecture, different weights
    snap = snapshot(other)
    with pytest.raises(pk.AdapterFileError, match="different weights"):
        pk.load_adapter(other, tmp_path)
    assert_untouched(other, snap)
    mlp = fresh("mlp")
    with pytest.raises(pk.AdapterFileError, match="different base"):
        pk.load_adapter(mlp, tmp_path)
    three, _ = pk.load_base("tiny", num_labels=3)
    with pytest.raises(pk.AdapterFileError, match="shape"):
        pk.load_adapter(three, tmp_path)
    assert not hasattr(three, "peftkit")


def test_load_into_an_adapted_model_is_refused(tmp_path):
    model = trained("lora", "tiny")
    pk.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="fresh base"):
        pk.load_adapter(model, tmp_path)


def test_saved_files_are_byte_reproducible(tmp_path):
    # safetensors orders a multi-key metadata map by hash, which would make identical adapters
    # differ byte for byte from one process to the next; write_tensors refuses that.
    model = trained("lora", "tiny")
    for name in ("a", "b"):
        pk.save_adapter(model, tmp_path / name)
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (tmp_path / "b" / "adapter.safetensors").read_bytes()
    from peftkit.files.adapter_file import write_tensors
    with pytest.raises(ValueError, match="at most one metadata key"):
        write_tensors(tmp_path / "x.safetensors", {"w": torch.zeros(2)}, {"a": "1", "b": "2"})
