"""Shared fixtures: the method matrix and the models it runs on."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (and thrashes on a busy machine)

import peftkit as pk
from peftkit.core.surgery import adapter_layers, lora_layers

MODELS = ("mlp", "tiny")


SMALL = {"r": 4, "alpha": 8, "size": 8}  # small settings, for fields a method has
MLP_TARGETS = ("fc1", "fc2")  # the MLP has no BERT names, so methods with targets get these


def _small(cls, settings: dict, base: str):
    """`cls` with the matrix's small settings, the variant's `settings`, and MLP targets."""
    if cls is pk.Hybrid:
        return pk.Hybrid(lora=_small(pk.LoRA, {}, base), adapter=_small(pk.Adapter, {"placement": "pfeiffer"}, base))
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in SMALL.items() if k in fields} | settings
    if base == "mlp" and "targets" in fields:
        kwargs["targets"] = MLP_TARGETS
    return cls(**kwargs)


def method_keys() -> tuple[str, ...]:
    """Every registered method, each with every variant it declares: "lora", "lora:rslora", ..."""
    return tuple(name + (f":{v}" if v else "") for name, cls in pk.METHODS.items() for v in cls.variants)


def make_method(key: str, base: str) -> pk.Method:
    """The method matrix, read from the registry (`pk.METHODS` and each class's `variants`)."""
    name, _, variant = key.partition(":")
    cls = pk.METHODS[name]
    return _small(cls, cls.variants[variant], base)


METHOD_KEYS = method_keys()


def adds(key: str, kind: str) -> bool:
    """Whether the method of `key` adds LoRA ("lora") or adapter ("adapter") layers to a model."""
    model = pk.apply(fresh("tiny"), make_method(key, "tiny"))
    return bool((lora_layers if kind == "lora" else adapter_layers)(model))


def make_inputs(base: str, seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    if base == "mlp":
        return {"x": torch.randn(batch, 16, generator=g)}
    ids = torch.randint(1000, 5000, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # one padded row, so masking is exercised
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def fresh(base: str, seed: int = 0):
    model, _ = pk.load_base(base, seed=seed)
    return model.eval()


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) for the real MiniLM; tests deep-copy the model before changing it."""
    model, tok = pk.load_base("minilm", seed=0)
    return model.eval(), tok


@pytest.fixture(scope="session")
def pw():
    """One Playwright driver per test process, shared by the browser tests (test_browser's JupyterLab, which lives
    for the session, and test_dashboard's Voila): its sync API allows one driver at a time in a process."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        yield p


def perturb(model, seed: int = 1, std: float = 0.05):
    """Give every adapter tensor non-zero values so an identity init cannot hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def clone(model):
    return copy.deepcopy(model)


@pytest.hookimpl(tryfirst=True)  # before pytest's own, which deselects by marker (-m)
def pytest_collection_modifyitems(session, config, items):
    """The notebook passes last, the browser's (and the dashboard's) after papermill's.

    Both run every notebook in quick mode and share one result cache (runs/): the first pass trains
    the quick runs, the second finds them cached. Training in the papermill kernel is the cheaper of
    the two: notebook 04 cold, back to back on an AMD EPYC, took 105 and 111 s with Run All in
    JupyterLab against 100 and 99 s under papermill (its 11 runs' train_seconds: 69.6 and 73.6 s
    against 66.3 and 65.1 s). So the browser pass comes second and opens every notebook warm, as a
    reader does after `make run`.
    """
    # The dashboard (apps/dashboard.ipynb) reads notebook 04's quick comparison from the cache: after the
    # notebooks it finds it there (15 s in make test on bbc160a) instead of training it (54 s on a6efec6).
    rank = {"test_notebooks.py": 1, "test_notebook_verdicts.py": 1, "test_browser.py": 2, "test_dashboard.py": 2}
    # `make test` runs the rest first, on two workers that each take whole files (-n 2 --dist loadfile
    # -m "not notebook_pass"), then the notebook passes alone, in this order. Flower's engine (one fixture,
    # about 80 s) goes first, so one worker starts it while the other takes the short files.
    first = {"test_flower.py": -1}
    items.sort(key=lambda item: rank.get(item.path.name, first.get(item.path.name, 0)))  # stable: files keep their order
    for item in items:
        if item.path.name in rank:
            item.add_marker(pytest.mark.notebook_pass)
            # `make test` runs the notebook passes on two workers too (-n 2 --dist loadgroup), two notebooks at a
            # time, each kernel on one torch thread (PEFTKIT_THREADS=1). A notebook's papermill run and its
            # JupyterLab run form one group, which one worker runs in this order, so the browser finds the runs
            # cached; the dashboard goes with notebook 04, whose comparison it reads. Two notebooks that need the
            # same run train it once: `compare` locks each run's key.
            group = _notebook_of(item)
            if group:
                item.add_marker(pytest.mark.xdist_group(name=group))


def _notebook_of(item) -> str | None:
    """The notebook number a notebook-pass test executes ("04"), or None for the others."""
    if item.path.name == "test_dashboard.py":
        return "04"
    params = getattr(getattr(item, "callspec", None), "params", {})
    run_tests = ("test_notebook_runs_in_quick_mode", "test_notebook_runs_in_jupyterlab_clean_and_its_widgets_answer")
    if item.originalname not in run_tests:
        return None
    target = params.get("path", params.get("notebook"))
    return Path(str(target)).name[:2] if target is not None else None
