"""An in-process federation: the four domains as four non-IID clients, rounds of local training
and aggregation (`federated.aggregate`), and what each round cost and gained.

One round t:
  1. the server samples clients (`sample`: a fraction or a count, seeded by (seed, t)), and each
     sampled client drops out with probability `dropout` (seeded too): its update never arrives;
  2. each remaining client starts from the global model, trains `local_steps` steps of
     `training.fit` on its own domain, and uploads its adapter state (`federated.client_state`);
  3. the server aggregates them (weighted by the clients' examples) and measures the aggregation
     error; FLoRA merges the stacked update into the global base and starts a fresh LoRA (seeded
     by round), as the paper does;
  4. the global model is evaluated on every client's test split, and the server broadcasts it.

The pieces a client and the server run (`Federation.local_update`, `Federation.server_round`)
are the ones the Flower apps (`flower_app`) run, so the two engines agree given the same seeds.

Bytes on the wire: up, each reporting client's payload (`federated.payload_bytes`: FFA-LoRA's
frozen A never travels); down, the server state broadcast to every client of the federation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import data
from ..bases.models import load_base
from ..core.methods import FullFineTune, LoRA, Method
from ..core.surgery import apply, unload
from ..data.loaders import make_loaders
from ..files.adapter_file import adapter_state, apply_and_fill
from ..training.loop import TrainConfig, fit
from ..training.metrics import evaluate
from .experiments import append_cache, config_key, read_cache
from .federated import (STRATEGIES, ClientState, FederatedError, aggregate, aggregation_error, client_state,
                        flora_method, payload_bytes)

CLIENTS = ("movies", "amazon", "nyt", "tweets")
HEAD = "classifier"


def default_method(strategy: str) -> Method:
    """LoRA r=8 on query and value for the LoRA strategies; a full fine-tune for FedAvg."""
    return FullFineTune() if strategy == "fedavg" else LoRA(r=8, alpha=16)


@dataclass
class Federation:
    """What the server and every client agree on before round 1, and the global model."""

    strategy: str
    method: Method
    base: str = "minilm"
    seed: int = 0
    lr: float | None = None          # None: the method's registry default
    batch_size: int = 16
    max_length: int = 128
    base_model: object = field(default=None, repr=False)  # the global base (FLoRA merges into it)
    tokenizer: object = field(default=None, repr=False)
    state: dict = field(default_factory=dict, repr=False)  # the global adapter state
    last_down: int = 0  # bytes the last round broadcast to each client
    merged: list = field(default_factory=list, repr=False)  # FLoRA: each round's stacked state, merged into the base
    ranks: dict | None = None  # FLoRA only: client -> its LoRA rank (default: the method's)
    fresh_round: int = 0  # FLoRA: the round whose seed initialised the global LoRA

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise FederatedError(f"unknown strategy {self.strategy!r}; choose one of {list(STRATEGIES)}.")
        is_lora = isinstance(self.method, LoRA)
        if self.strategy == "fedavg" and is_lora or self.strategy != "fedavg" and not is_lora:
            want = "a LoRA spec" if self.strategy != "fedavg" else "a non-LoRA method such as FullFineTune()"
            raise FederatedError(f"strategy {self.strategy!r} needs {want}, got {self.method.describe()}.")
        self.lr = self.lr if self.lr is not None else self.method.default_lr
        if self.ranks and self.strategy != "flora":
            raise FederatedError(f"ranks per client: only FLoRA stacks factors of different ranks, not {self.strategy!r}.")
        for c, r in (self.ranks or {}).items():
            if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
                raise FederatedError(f"ranks[{c!r}] must be a positive integer rank, got {r!r}.")
        if self.base_model is None:
            self.base_model, self.tokenizer = load_base(self.base, num_labels=2, seed=self.seed)
        self.state = self.fresh_state(0)

    def fresh_state(self, round_: int, head: dict | None = None, method: Method | None = None) -> dict:
        """The method applied to the global base from seed (seed, round): A kaiming, B zero (the
        shared A of FFA-LoRA; FLoRA's re-initialised LoRA), with `head` (name -> tensor) if given."""
        model = copy.deepcopy(self.base_model)
        torch.manual_seed(self.seed * 1009 + round_)
        apply(model, method or self.method, head=HEAD)
        state = {k: v.detach().clone() for k, v in adapter_state(model).items()}
        state.update(head or {})
        return state

    def model(self, state: dict | None = None, method: Method | None = None):
        """The global base with `method` applied and `state` loaded (default: the global model)."""
        model = copy.deepcopy(self.base_model)
        return apply_and_fill(model, method or self.method, HEAD, self.state if state is None else state,
                              "the global adapter state")

    def local_update(self, loaders: dict, local_steps: int, client_seed: int,
                     client: str | None = None) -> tuple[ClientState, float]:
        """One client's round: the global model, `local_steps` steps of `fit` on its train loader
        (FFA-LoRA: with A frozen), its upload and mean training loss. With FLoRA ranks per client,
        the client's fresh LoRA has its own rank (A from the round's seed, B zero)."""
        r = (self.ranks or {}).get(client)
        if r is not None and r != self.method.r:
            method = dataclasses.replace(self.method, r=r)
            head = {k: v for k, v in self.state.items() if k.startswith(HEAD + ".")}
            model = self.model(self.fresh_state(self.fresh_round, head, method), method)
        else:
            model = self.model()
        if self.strategy == "ffa":
            for n, p in model.named_parameters():
                if n.rsplit(".", 1)[-1] == "lora_A":
                    p.requires_grad_(False)
        per_epoch = len(loaders["train"])
        cfg = TrainConfig(epochs=math.ceil(local_steps / per_epoch), max_steps=local_steps, lr=self.lr,
                          batch_size=self.batch_size, warmup_ratio=0.0, seed=client_seed, progress=False)
        hist = fit(model, loaders["train"], None, cfg)
        return client_state(model, n_examples=len(loaders["train"].dataset)), float(hist.loss.mean())

    def server_round(self, uploads: list[ClientState], round_: int) -> float:
        """Aggregate the uploads into the global model; returns the aggregation error. FLoRA's
        stacked state is merged into the global base, and kept in `merged`."""
        if not uploads:  # every sampled client dropped out: the global model stays as it was
            self.last_down = 0
            return float("nan")
        new = aggregate(uploads, self.strategy, base=self.model())
        error = aggregation_error(uploads, new, self.strategy)
        # the broadcast: FLoRA's stacked factors (each client merges them) and head; else the new state
        self.last_down = payload_bytes(new, "fedit" if self.strategy == "flora" else self.strategy, "down")
        if self.strategy == "flora":
            self.merge_update(new)
            head = {k: v for k, v in new.items() if k.startswith(HEAD + ".")}
            self.state, self.fresh_round = self.fresh_state(round_, head), round_
            self.merged.append(new)
        else:
            self.state = new
        return error

    def merge_update(self, stacked: dict) -> None:
        """FLoRA: merge a stacked server state (scale 1) into the global base's weights."""
        model = self.model(stacked, flora_method(self.method, stacked))
        self.base_model = unload(model)  # s B A merged into the base weights, the wrappers gone


def client_loaders(tokenizer, domain: str, n_train: int | None, n_eval: int | None, seed: int,
                   batch_size: int, max_length: int) -> dict:
    """A client's train and test loaders: its domain's split (seeded), subsampled."""
    splits = data.subset(data.split(data.load_corpus(domain), seed=seed), n_train, n_eval, seed, domain)
    return make_loaders(tokenizer, {"train": splits["train"], "test": splits["test"]}, batch_size=batch_size,
                        max_length=max_length, seed=seed)


def _check_args(rounds, local_steps, clients, sample, dropout):
    if not (isinstance(rounds, int) and rounds >= 1):
        raise FederatedError(f"rounds must be an integer >= 1, got {rounds!r}.")
    if not (isinstance(local_steps, int) and local_steps >= 1):
        raise FederatedError(f"local_steps must be an integer >= 1, got {local_steps!r}.")
    unknown = [c for c in clients if c not in data.FILES]
    if not clients or unknown or len(set(clients)) < len(clients):
        raise FederatedError(f"clients must be distinct domains of {list(data.FILES)}, got {list(clients)}.")
    ok = (isinstance(sample, float) and 0 < sample <= 1) or (isinstance(sample, int) and not isinstance(sample, bool)
                                                              and 1 <= sample <= len(clients))
    if not ok:
        raise FederatedError(f"sample must be a fraction in (0, 1] or a count of clients in 1..{len(clients)}, "
                             f"got {sample!r}.")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise FederatedError(f"dropout must be a probability in [0, 1), got {dropout!r}.")


def client_seed(seed: int, round_: int, index: int) -> int:
    """The training seed of the `index`-th client of the federation in round `round_` (data order, dropout)."""
    return seed * 1009 + 31 * round_ + index


def round_plan(round_: int, clients, sample, dropout: float, seed: int) -> tuple[list[str], list[str]]:
    """(sampled, dropped) clients of a round: a pure function of (seed, round)."""
    rng = random.Random(seed * 7919 + round_)
    k = sample if isinstance(sample, int) else max(1, round(sample * len(clients)))
    sampled = sorted(rng.sample(list(clients), k), key=list(clients).index)
    dropped = [c for c in sampled if rng.random() < dropout]
    return sampled, dropped


def simulate_federated(strategy: str, rounds: int = 5, local_steps: int = 10, clients=CLIENTS, sample=1.0,
                       dropout: float = 0.0, seed: int = 0, base: str = "minilm", n_train: int | None = 256,
                       n_eval: int | None = 200, method: Method | None = None, lr: float | None = None,
                       batch_size: int = 16, max_length: int = 128, ranks: dict | None = None,
                       progress: bool = True, cache=None) -> pd.DataFrame:
    """Run a federation of the domain `clients` in this process; one row per round and client.

    Columns: strategy, round (0: before training), client, sampled, dropped, trained (its update
    was aggregated), accuracy (the global model after the round, on the client's test split),
    train_loss, bytes_up, bytes_down, round_bytes (the round's total on the wire),
    aggregation_error (`federated.aggregation_error`; NaN when no update arrived). ranks (FLoRA
    only): {client: rank}, e.g. {"tweets": 4}; the others keep the method's. `df.attrs`
    holds the settings and the final global state (`federation`).

    cache: a JSON-lines file (e.g. runs/federated.jsonl) that keeps each simulation's rows under a
    key of every setting above, so that a second run with the same settings trains nothing. A cached
    result has the same rows and settings, `attrs["cached"]` True and no `federation` (the model
    state is not kept; run without a cache to get it).
    """
    clients = tuple(clients)
    _check_args(rounds, local_steps, clients, sample, dropout)
    unknown = sorted(set(ranks or {}) - set(clients))
    if unknown:
        raise FederatedError(f"ranks names clients {unknown} that are not in this federation {list(clients)}.")
    method = method or default_method(strategy)
    key = config_key({"study": "federated", "strategy": strategy, "method": method.to_dict(), "rounds": rounds,
                      "local_steps": local_steps, "clients": list(clients), "sample": sample, "dropout": dropout,
                      "seed": seed, "base": base, "n_train": n_train, "n_eval": n_eval, "lr": lr,
                      "batch_size": batch_size, "max_length": max_length, "ranks": dict(ranks or {})})
    hit = read_cache(cache).get(key) if cache else None
    if hit is not None:
        df = pd.DataFrame(hit["rows"])
        df.attrs.update(hit["attrs"], cached=True)
        return df
    fed = Federation(strategy, method, base, seed, lr, batch_size, max_length, ranks=dict(ranks or {}))
    loaders = {c: client_loaders(fed.tokenizer, c, n_train, n_eval, seed, batch_size, max_length) for c in clients}
    rows = []

    def record(round_, sampled, dropped, trained, losses, up, down, error):
        for c in clients:
            acc = evaluate(glob, loaders[c]["test"], num_labels=2)["accuracy"]
            rows.append({"strategy": strategy, "round": round_, "client": c, "sampled": c in sampled,
                         "dropped": c in dropped, "trained": c in trained, "accuracy": acc,
                         "train_loss": losses.get(c, float("nan")), "bytes_up": up.get(c, 0),
                         "bytes_down": down, "aggregation_error": error})

    glob = fed.model().eval()
    record(0, [], [], [], {}, {}, 0, float("nan"))
    bar = tqdm(total=rounds * len(clients), desc=f"federated {strategy}", disable=not progress)
    for t in range(1, rounds + 1):
        sampled, dropped = round_plan(t, clients, sample, dropout, seed)
        uploads, losses, up = [], {}, {}
        for i, c in enumerate(clients):
            if c in sampled and c not in dropped:
                upload, losses[c] = fed.local_update(loaders[c], local_steps, client_seed(seed, t, i), client=c)
                uploads.append(upload)
                up[c] = payload_bytes(upload.tensors, strategy)
            bar.update(1)
        error = fed.server_round(uploads, t)
        glob = fed.model().eval()
        record(t, sampled, dropped, [c for c in clients if c in up], losses, up,
               fed.last_down if uploads else 0, error)
    bar.close()
    df = pd.DataFrame(rows)
    df["round_bytes"] = df.groupby("round")["bytes_up"].transform("sum") + df["bytes_down"] * len(clients)
    df.attrs.update(strategy=strategy, method=fed.method.to_dict(), rounds=rounds, local_steps=local_steps,
                    sample=sample, dropout=dropout, seed=seed, base=base, n_train=n_train, n_eval=n_eval,
                    lr=fed.lr)
    if cache:
        append_cache({"key": key, "rows": df.to_dict("records"), "attrs": dict(df.attrs)}, cache)
    df.attrs.update(federation=fed, cached=False)
    return df


def constant_answer_accuracy(clients=CLIENTS, n_eval: int | None = None, seed: int = 0) -> float:
    """The accuracy of always answering the better of the two labels on the clients' test items (those
    `simulate_federated` scores with the same n_eval and seed), averaged over clients as `per_round`
    averages accuracy: the floor a server model must beat before its accuracy says it learned anything."""
    _check_args(1, 1, clients, 1.0, 0.0)
    positive = [float(data.subset(data.split(data.load_corpus(c), seed=seed), None, n_eval, seed, c)["test"]["label"].mean())
                for c in clients]
    share = sum(positive) / len(positive)
    return max(share, 1 - share)


def per_round(df: pd.DataFrame) -> pd.DataFrame:
    """One row per strategy and round: mean accuracy over the clients, cumulative bytes, error."""
    g = df.groupby(["strategy", "round"], sort=False)
    out = g.agg(accuracy=("accuracy", "mean"), min_accuracy=("accuracy", "min"), round_bytes=("round_bytes", "first"),
                aggregation_error=("aggregation_error", "first"), trained=("trained", "sum")).reset_index()
    out["cumulative_bytes"] = out.groupby("strategy")["round_bytes"].cumsum()
    return out


__all__ = ["CLIENTS", "Federation", "client_loaders", "client_seed", "constant_answer_accuracy", "default_method", "per_round",
           "round_plan",
           "simulate_federated"]
