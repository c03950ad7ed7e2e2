"""Federated adaptation: the server's aggregation of the clients' adapters, as pure functions.

Each client k trains a copy of the global adapter on its own data and sends back its adapter
state (the tensors `files.adapter_file.adapter_state` gives: LoRA factors and the head). The
server combines them into one, weighting client k by w_k (sum 1). For LoRA the update of a layer
is dW = s B A (s = alpha/r, or alpha/sqrt(r) with rsLoRA), and what a federation wants is the
average update sum_k w_k s B_k A_k. The four strategies differ in how close they get:

- "fedit" (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
  ICASSP 2024): average A and B separately. s avg(B) avg(A) is not avg(s B A): the cross terms
  B_j A_k (j != k) enter, so the result is inexact. `aggregation_error` measures by how much.
- "ffa" (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
  FFA-LoRA): A is frozen at a shared, seeded initialisation and only B trains. Then
  avg(s B_k A) = s avg(B_k) A exactly, and only B (half of the factors) travels.
- "flora" (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
  Low-Rank Adaptations", NeurIPS 2024): stack the factors, A = [A_1; ...; A_K] (sum r_k rows) and
  B = [c_1 B_1, ..., c_K B_K] with c_k = w_k s_k / s_server, so s_server B A = sum_k w_k s_k B_k A_k
  exactly; the ranks may differ per client. The stacked adapter has rank sum_k r_k and scale 1
  (`flora_method`). As in the paper, the server sends the stacked factors back, each client
  merges s B A into its base weights and starts a fresh LoRA for the next round
  (`federated_sim` does this), so the rank never grows beyond one round's sum.
- "fedavg" (McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017): the weighted mean of every tensor; for a full fine-tune,
  the classic algorithm.

Tensors that are not LoRA factors (the classifier head, bottleneck adapters, a full fine-tune's
weights) are averaged under every strategy: for them the average of the parameters is what
FedAvg defines.

Every check runs before anything is combined, and says what to do: no clients, an unknown
strategy, weights of the wrong length or sign, clients of different methods, bases (by the
fingerprint `save_adapter` records) or tensor names and shapes, NaN, FFA-LoRA clients whose A
differ, and a LoRA strategy on states without LoRA factors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.methods import LoRA, Method
from ..core.surgery import applied, find_head
from ..files.adapter_file import AdapterFile, adapter_state, fingerprint, read_adapter
from ..layers.names import LORA_PREFIX

# strategy -> (label, colour). The colours are fixed here, as the methods' are in the
# registry, so every figure draws a strategy in the same colour; fedavg takes the full fine-tune's.
STRATEGIES = {
    "fedit": ("FedIT (average A and B)", "#8c564b"),
    "ffa": ("FFA-LoRA (A frozen, average B)", "#17becf"),
    "flora": ("FLoRA (stack the factors)", "#e377c2"),
    "fedavg": ("FedAvg (full fine-tune)", None),  # None: the registry's colour for "full"
}
LORA_STRATEGIES = ("fedit", "ffa", "flora")


class FederatedError(ValueError):
    """Clients that cannot be aggregated: nothing was combined."""


@dataclass(frozen=True)
class ClientState:
    """One client's upload: its adapter tensors, and what they are (method spec and base
    fingerprint, both as `save_adapter` records them). `n_examples` may serve as its weight."""

    tensors: dict
    method: Method | None = None
    base: dict | None = None
    n_examples: int | None = None


def client_state(model: nn.Module, n_examples: int | None = None) -> ClientState:
    """A trained client model's upload: detached copies of its adapter tensors, its method and
    its base fingerprint."""
    done = applied(model)
    if done is None:
        raise FederatedError("this client model has no peftkit method applied: apply(model, method) first.")
    tensors = {k: v.detach().clone().cpu() for k, v in adapter_state(model).items()}
    head = done.heads if len(done.heads) > 1 else done.head
    return ClientState(tensors, done.method, fingerprint(model, head, done.method), n_examples)


def _as_client(obj, i: int) -> ClientState:
    if isinstance(obj, ClientState):
        return obj
    if isinstance(obj, (str, Path)):
        obj = read_adapter(obj)
    if isinstance(obj, AdapterFile):
        return ClientState(dict(obj.tensors), obj.method, obj.meta.get("base"))
    if isinstance(obj, nn.Module):
        return client_state(obj)
    if isinstance(obj, dict):
        return ClientState(dict(obj))
    raise FederatedError(f"client {i} is a {type(obj).__name__}; give a dict of tensors (name -> tensor), a "
                         "ClientState, an adapter folder or AdapterFile, or a model with a method applied.")


def lora_pairs(names) -> dict[str, tuple[str, str]]:
    """A-factor name -> (A name, B name) for every LoRA pair among `names`: `...lora_A`/`...lora_B`,
    and the embedding and attention layers' `lora_embedding_A`/`_B`, `lora_out_A`/`_B`."""
    names = set(names)
    pairs = {}
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if leaf.startswith(LORA_PREFIX) and leaf.endswith("A"):
            b = n[:-1] + "B"
            if b in names:
                pairs[n] = (n, b)
    return pairs


def scale_of(method: Method | None, r: int) -> float:
    """LoRA's scale for rank r under `method`'s alpha (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    lora = _lora_spec(method)
    if lora is None:
        raise FederatedError("LoRA strategies need the clients' LoRA spec for the scale alpha/r: pass method=LoRA(...) "
                             "or give ClientStates, adapter folders or models, which carry it.")
    return lora.alpha / (math.sqrt(r) if lora.rslora else r)


def _lora_spec(method: Method | None) -> LoRA | None:
    if isinstance(method, LoRA):
        return method
    inner = getattr(method, "lora", None)  # Hybrid holds one
    return inner if isinstance(inner, LoRA) else None


def update(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """s B A in the factors' layout, (out, in * k...): the same for Linear, conv and embedding pairs."""
    return scale * (B.reshape(B.shape[0], -1).double() @ A.reshape(A.shape[0], -1).double())


def check_weights(weights, n: int) -> list[float]:
    """The weights normalised to sum 1; equal when None. Raises FederatedError for a bad list."""
    if weights is None:
        return [1.0 / n] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise FederatedError(f"weights must be a list of numbers, one per client; got {weights!r:.80}.") from None
    if len(w) != n:
        raise FederatedError(f"weights has {len(w)} entries for {n} clients: give one weight per client "
                             "(e.g. its number of examples), or None for equal weights.")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise FederatedError(f"weights must be finite, non-negative and not all zero; got {w}.")
    return [x / sum(w) for x in w]


def _check_clients(clients: list[ClientState], strategy: str, method, base) -> Method | None:
    """Every refusal, before anything is combined. Returns the clients' common method (or `method`)."""
    methods = [c.method for c in clients if c.method is not None]
    if method is not None and not isinstance(method, Method):
        raise FederatedError(f"method must be a peftkit Method such as LoRA(r=8), got {type(method).__name__}.")
    ref = method if method is not None else (methods[0] if methods else None)
    for i, c in enumerate(clients):
        if c.method is not None and ref is not None and not _same_method(c.method, ref, strategy):
            raise FederatedError(f"client {i} trained {c.method.describe()}, the others {ref.describe()}: a server "
                                 "aggregates one method. Train every client with the same spec (FLoRA alone allows "
                                 "different ranks).")
    server = base
    if isinstance(base, nn.Module):
        done = applied(base)
        m = done.method if done is not None else ref
        head = (done.heads if len(done.heads) > 1 else done.head) if done is not None else find_head(base)
        server = fingerprint(base, head, m) if m is not None else None
    prints = [(i, c.base) for i, c in enumerate(clients) if c.base is not None]
    want = server if server is not None else (prints[0][1] if prints else None)
    for i, fp in prints:
        if not _same_base(fp, want):
            whose = "the server's" if server is not None else "client 0's"
            raise FederatedError(
                f"client {i}'s base fingerprint differs from {whose} ({fp.get('architecture')}, {fp.get('n_params')} "
                f"base parameters, against {want.get('architecture')}, {want.get('n_params')}): it trained on another "
                "base model, so its tensors mean something else. Start every client from the server's base "
                "(the same load_base name and seed).")
    names = set(clients[0].tensors)
    for i, c in enumerate(clients):
        if not c.tensors:
            raise FederatedError(f"client {i} sent no tensors; it must send its adapter state (adapter_state(model)).")
        if set(c.tensors) != names:
            missing, extra = sorted(names - set(c.tensors))[:3], sorted(set(c.tensors) - names)[:3]
            raise FederatedError(f"client {i}'s tensors differ from client 0's: missing {missing}, unexpected {extra}. "
                                 "Every client must train the same targets and head.")
        for k, t in c.tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise FederatedError(f"client {i}: {k} must be a floating-point tensor, got "
                                     f"{getattr(t, 'dtype', type(t).__name__)}.")
            if not torch.isfinite(t).all():
                raise FederatedError(f"client {i}: {k} holds NaN or inf (a diverged local run?). Drop this client's "
                                     "update for the round, or lower its learning rate.")
    pairs = lora_pairs(names)
    if strategy in LORA_STRATEGIES and not pairs:
        raise FederatedError(f"strategy {strategy!r} aggregates LoRA factors, but these states hold none "
                             f"(e.g. {sorted(names)[:3]}). For a full fine-tune or adapters use strategy='fedavg'.")
    factor_names = {n for p in pairs.values() for n in p}
    for i, c in enumerate(clients):
        for k in names:
            got, want_shape = tuple(c.tensors[k].shape), tuple(clients[0].tensors[k].shape)
            if got == want_shape or (strategy == "flora" and k in factor_names and _rank_only(k, got, want_shape, pairs)):
                continue
            hint = " Only FLoRA stacks factors of different ranks (strategy='flora')." if k in factor_names else ""
            raise FederatedError(f"client {i}: {k} has shape {got}, client 0's {want_shape}; the clients must train "
                                 f"the same targets on the same base.{hint}")
        for a, b in pairs.values():
            if c.tensors[a].shape[0] != c.tensors[b].shape[1]:
                raise FederatedError(f"client {i}: {a} has rank {c.tensors[a].shape[0]} but {b} rank "
                                     f"{c.tensors[b].shape[1]}; they are not one LoRA pair.")
    if strategy == "ffa":
        for a_name, _ in pairs.values():
            for i, c in enumerate(clients[1:], 1):
                if not torch.equal(c.tensors[a_name], clients[0].tensors[a_name]):
                    raise FederatedError(f"FFA-LoRA needs one frozen A on every client, but client {i}'s {a_name} differs "
                                         "from client 0's. Initialise A from the shared seed and freeze it "
                                         "(lora_A.requires_grad_(False)) before local training.")
    return ref


def _rank_only(name: str, got: tuple, want: tuple, pairs) -> bool:
    """True when two factor shapes differ in the rank axis alone (dim 0 of A, dim 1 of B)."""
    if len(got) != len(want):
        return False
    axis = 0 if name in pairs else 1
    return all(g == w for d, (g, w) in enumerate(zip(got, want)) if d != axis)


def _same_method(a: Method, b: Method, strategy: str) -> bool:
    if strategy == "flora" and isinstance(a, LoRA) and isinstance(b, LoRA):
        a, b = dataclasses.replace(a, r=b.r), b
    return a.to_dict() == b.to_dict()


def _same_base(a: dict, b: dict | None) -> bool:
    if b is None:
        return True
    return all(a.get(k) == b.get(k) for k in ("architecture", "params_sha256", "stable_values_sha256"))


def aggregate(client_states, strategy: str = "fedit", weights=None, method: Method | None = None,
              base=None) -> dict[str, torch.Tensor]:
    """The server's adapter state from the clients' (see the module docstring for each strategy).

    client_states: one per client: a dict of tensors (as `adapter_state` gives), a ClientState, an
    adapter folder or AdapterFile, or a model with a method applied. weights: one per client
    (e.g. its examples), normalised; None: the clients' `n_examples` when every one carries it,
    else equal. method: the clients' spec, needed for LoRA's
    scale when the states are plain dicts. base: the server's base (a model, or its fingerprint
    dict); every client that carries a fingerprint must match it.
    For "flora" the result has rank sum r_k and scale 1: load it with `flora_method(method, state)`.
    """
    if strategy not in STRATEGIES:
        raise FederatedError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}.")
    states = list(client_states) if not isinstance(client_states, dict) else None
    if states is None:
        raise FederatedError("client_states must be a list with one state per client, not one dict of tensors.")
    if not states:
        raise FederatedError("no client states to aggregate: at least one client must report back.")
    clients = [_as_client(s, i) for i, s in enumerate(states)]
    if weights is None and all(c.n_examples for c in clients):
        weights = [c.n_examples for c in clients]
    w = check_weights(weights, len(clients))
    ref = _check_clients(clients, strategy, method, base)
    names = list(clients[0].tensors)
    pairs = lora_pairs(names) if strategy in LORA_STRATEGIES else {}
    factors = {n for p in pairs.values() for n in p}
    out = {}
    for n in names:
        if n not in factors:
            out[n] = _mean([c.tensors[n] for c in clients], w)
    if strategy in ("fedit", "ffa"):  # FFA's A are equal, so their mean is that A (bit for bit: checked equal)
        for a, b in pairs.values():
            out[a] = clients[0].tensors[a].clone() if strategy == "ffa" else _mean([c.tensors[a] for c in clients], w)
            out[b] = _mean([c.tensors[b] for c in clients], w)
    elif strategy == "flora":
        for a, b in pairs.values():
            As = [c.tensors[a] for c in clients]
            coef = [wk * scale_of(c.method or ref, A.shape[0]) for wk, c, A in zip(w, clients, As)]  # w_k s_k / 1
            out[a] = torch.cat(As, dim=0)  # (sum r_k, in, ...)
            out[b] = torch.cat([(ck * c.tensors[b].double()).to(c.tensors[b].dtype) for ck, c in zip(coef, clients)], dim=1)
    return {n: out[n] for n in names}


def _mean(ts: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    acc = sum(wk * t.double() for wk, t in zip(w, ts))  # in double: the weighted mean, rounded once
    return acc.to(ts[0].dtype)


def flora_method(method: Method, state: dict) -> LoRA:
    """The LoRA spec of a FLoRA server state: the clients' targets, the stacked rank, scale 1."""
    lora = _lora_spec(method)
    if lora is None:
        raise FederatedError(f"flora_method needs the clients' LoRA spec, got {method!r}.")
    ranks = {state[a].shape[0] for a, _ in lora_pairs(state).values()}
    if len(ranks) != 1:
        raise FederatedError(f"this state's LoRA factors have different ranks {sorted(ranks)}; it is no FLoRA server state.")
    r = ranks.pop()
    return dataclasses.replace(lora, r=r, alpha=float(r), rslora=False)


def delta_weights(state: dict, method: Method | None = None, scale: float | None = None) -> dict[str, torch.Tensor]:
    """Each LoRA pair's update s B A (float64), keyed by its A name. `scale` overrides the
    method's alpha/r (a FLoRA server state has scale 1)."""
    out = {}
    for a, b in lora_pairs(state).values():
        s = scale if scale is not None else scale_of(method, state[a].shape[0])
        out[a] = update(state[a], state[b], s)
    return out


def aggregation_error(client_states, server_state: dict, strategy: str, weights=None,
                      method: Method | None = None) -> float:
    """|| sum_k w_k s B_k A_k - dW_server ||_F over all LoRA layers (the root of the summed squares):
    how far the server's update is from the exact average of the clients'. 0 (to rounding) for
    "ffa" and "flora"; for "fedit", || avg(s B A) - s avg(B) avg(A) ||; 0 for "fedavg" without
    LoRA factors (an average of parameters is its own definition)."""
    clients = [_as_client(s, i) for i, s in enumerate(client_states)]
    w = check_weights(weights if weights is not None else
                      ([c.n_examples for c in clients] if all(c.n_examples for c in clients) else None), len(clients))
    pairs = lora_pairs(server_state)
    if not pairs:
        return 0.0
    ref = method or next((c.method for c in clients if c.method is not None), None)
    server_scale = 1.0 if strategy == "flora" else None
    got = delta_weights(server_state, ref, server_scale)
    total = 0.0
    for a, b in pairs.values():
        exact = sum(wk * update(c.tensors[a], c.tensors[b], scale_of(c.method or ref, c.tensors[a].shape[0]))
                    for wk, c in zip(w, clients))
        total += float((exact - got[a]).pow(2).sum())
    return math.sqrt(total)


def wire_state(state: dict, strategy: str) -> dict:
    """The tensors a strategy puts on the wire for `state`: all of them, except that FFA-LoRA
    never sends A (every client re-creates it from the shared seed)."""
    skip = {a for a, _ in lora_pairs(state).values()} if strategy == "ffa" else set()
    return {n: t for n, t in state.items() if n not in skip}


def payload_bytes(state: dict, strategy: str, direction: str = "up") -> int:
    """Bytes of the tensors a strategy sends for `state` (`wire_state`), either way."""
    if direction not in ("up", "down"):
        raise FederatedError(f"direction must be 'up' or 'down', got {direction!r}.")
    return sum(t.numel() * t.element_size() for t in wire_state(state, strategy).values())
