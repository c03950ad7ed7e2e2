"""One registry drives every list: a method registered in `METHODS` shows up in the command
line, tuning, the plots' colours, the test matrix and the files, with nothing else edited."""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import pytest

import peftkit as pk
from peftkit import cli, style
from peftkit.core.methods import METHODS, Knob
from peftkit.notebook.plots import pareto_figure
from peftkit.studies import tuning
from conftest import fresh, make_method, method_keys


def test_every_registered_method_carries_what_the_lists_need():
    colors = [cls.color for cls in METHODS.values()]
    assert len(set(colors)) == len(colors), "two methods share a colour"
    for name, cls in METHODS.items():
        assert cls.name == name and cls.label and cls.lr_reason
        assert cls.default_lr > 0
        low, high = cls.lr_space[:2]
        assert low <= cls.default_lr <= high, f"{name}: its default lr lies outside the rates a search tries"
        fields = {f.name for f in dataclasses.fields(cls)}
        for k in cls.knobs:
            assert k.field in fields, f"{name}: knob {k.key!r} names no field"
        assert cls.variants and all(set(v) <= fields for v in cls.variants.values())


def test_cli_defaults_come_from_the_registry():
    args = cli.build_parser().parse_args(["train", "--method", "full", "--out", "x"])
    assert cli._config(args, "full").lr == pk.FullFineTune.default_lr
    args = cli.build_parser().parse_args(["train", "--out", "x", "--lr", "3e-4", "--r", "4", "--targets", "query,key"])
    assert cli._config(args, "lora").lr == 3e-4
    assert cli.method_from_args("lora", args) == pk.LoRA(r=4, targets=("query", "key"))
    args = cli.build_parser().parse_args(["train", "--out", "x", "--lora-dropout", "0.1", "--adapter-size", "12"])
    assert cli.method_from_args("hybrid", args) == pk.Hybrid(lora=pk.LoRA(dropout=0.1), adapter=pk.Adapter(size=12))


@pytest.fixture
def new_method():
    """A method registered for one test: LoRA on every attention projection, under its own name."""

    @pk.register("lora_qkv")
    @dataclass(frozen=True)
    class LoRAQKV(pk.LoRA):
        label: ClassVar[str] = "LoRA q,k,v"
        color: ClassVar[str] = "#17becf"
        knobs: ClassVar[tuple[Knob, ...]] = pk.LoRA.knobs
        targets: tuple[str, ...] = ("query", "key", "value")

    try:
        yield LoRAQKV
    finally:
        del METHODS["lora_qkv"]


def test_a_new_registered_method_shows_up_everywhere(new_method, tmp_path):
    # the command line: accepted, built from its knobs, and named in --help
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--method", "lora_qkv", "--r", "4", "--out", "x"])
    assert cli.method_from_args("lora_qkv", args) == new_method(r=4)
    assert "lora_qkv" in parser._subparsers._group_actions[0].choices["train"].format_help()
    # tuning: a search space from its knobs, and sampled values build it
    assert {"r", "alpha", "dropout", "lr"} <= set(tuning.default_space("lora_qkv"))
    assert "lora_qkv" in tuning.method_knobs()
    m, _ = tuning.build("lora_qkv", {"r": 2, "lr": 1e-3})
    assert m == new_method(r=2, alpha=4)
    # the plots' colours
    assert style.method_colors()["lora_qkv"] == "#17becf"
    df = pd.DataFrame({"method": ["lora", "lora_qkv"], "label": ["a", "b"], "trainable": [10, 20],
                       "accuracy": [0.7, 0.8], "f1_macro": [0.7, 0.8], "trainable_pct": [1.0, 2.0]})
    colours = {t.name: t.marker.color for t in pareto_figure(df).data if t.name != "Pareto front"}
    assert colours == {"LoRA": pk.LoRA.color, "LoRA q,k,v": "#17becf"}  # each under its registered label
    # the test matrix: it gets every invariant test, and applies
    assert "lora_qkv" in method_keys()
    model = pk.apply(fresh("tiny"), make_method("lora_qkv", "tiny"))
    assert any(n.endswith("attention.self.key") for n in pk.report(model).module)
    # files: saved and loaded by name
    pk.save_adapter(model, tmp_path / "a")
    loaded = pk.load_adapter(fresh("tiny"), tmp_path / "a")
    assert type(loaded.peftkit.method) is new_method


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        @pk.register("lora")
        @dataclass(frozen=True)
        class Other(pk.Method):
            pass
    assert METHODS["lora"] is pk.LoRA
    assert not math.isnan(pk.LoRA.default_lr)
