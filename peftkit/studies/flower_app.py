"""The federation on a real engine: Flower's (flwr) ClientApp and ServerApp, running the same
client and server code as the in-process simulator (`federated_sim.Federation`).

- the ServerApp asks each SuperNode which domain it holds, then for each round draws the same
  sample and dropouts as the simulator (`round_plan`), sends the global state to the clients
  that take part, and aggregates their uploads with `Federation.server_round`
  (`federated.aggregate`), in the federation's client order;
- the ClientApp builds the same global model (the base from the same seed; for FLoRA, every
  merged round replayed, since a ClientApp keeps no state between messages), trains with
  `Federation.local_update` (`training.fit`) and replies with its upload, method and base
  fingerprint, which the server checks.

At the end the server writes the global state to `<out>/state.safetensors` (FLoRA: also each
round's stacked update, `merged-<t>.safetensors`) and the rounds' errors and bytes to
`<out>/rounds.json` (safetensors and JSON: nothing is pickled).

`write_project(folder, **config)` writes the Flower app folder (a pyproject.toml naming these two
apps and the run config); see docs/federated.md for running it on 127.0.0.1 or across machines.
Needs `pip install flwr` (the `federated` extra).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..core.methods import Method
from ..files.adapter_file import write_json, write_tensors
from .federated import ClientState, FederatedError, payload_bytes, wire_state
from .federated_sim import CLIENTS, Federation, client_loaders, client_seed, default_method, round_plan

DEFAULTS = {  # the run config: [tool.flwr.app.config], overridable with `flwr run --run-config`
    "strategy": "ffa", "rounds": 2, "local-steps": 2, "clients": ",".join(CLIENTS), "sample": 1.0,
    "dropout": 0.0, "seed": 0, "base": "minilm", "n-train": 256, "n-eval": 200, "lr": 0.0,  # 0: registry default
    "batch-size": 16, "max-length": 128, "method": "", "out": "runs/federated-flower", "wait-s": 120,
    "ranks": "",  # FLoRA only: "client:rank,...", e.g. "tweets:4"
}


def settings(run_config) -> dict:
    """The run config with defaults filled in, and the method as a Method."""
    cfg = {**DEFAULTS, **dict(run_config)}
    cfg["clients"] = tuple(c for c in str(cfg["clients"]).split(",") if c)
    spec = cfg["method"]
    cfg["method"] = Method.from_dict(json.loads(spec)) if spec else default_method(cfg["strategy"])
    cfg["sample"] = float(cfg["sample"])  # a fraction of the clients, in (0, 1]
    try:
        cfg["ranks"] = {c: int(r) for c, r in (item.split(":") for item in str(cfg["ranks"]).split(",") if item)}
    except ValueError:
        raise FederatedError(f"ranks must read 'client:rank,...' (e.g. 'tweets:4'), got {cfg['ranks']!r}.") from None
    return cfg


def federation(cfg: dict) -> Federation:
    return Federation(cfg["strategy"], cfg["method"], cfg["base"], int(cfg["seed"]), float(cfg["lr"]) or None,
                      int(cfg["batch-size"]), int(cfg["max-length"]), ranks=cfg["ranks"])


# --- the client ---------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.query()
def which_client(msg: Message, context: Context) -> Message:
    """Tell the server which domain this SuperNode holds (its --node-config client=...)."""
    domain = str(context.node_config.get("client", ""))
    return Message(RecordDict({"info": ConfigRecord({"client": domain})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round on this client: the global model, local steps of fit, the upload."""
    cfg = settings(context.run_config)
    domain = str(context.node_config["client"])
    info = msg.content["config"]
    fed = federation(cfg)
    for i in range(int(info["merged"])):  # FLoRA: every stacked update merged so far, in order
        fed.merge_update(msg.content[f"merged-{i}"].to_torch_state_dict())
    # FFA-LoRA's A is not sent: this client's own seeded A (Federation's round-0 state) stands in
    fed.state = {**fed.state, **msg.content["state"].to_torch_state_dict()}
    fed.fresh_round = int(info["fresh-round"])
    loaders = client_loaders(fed.tokenizer, domain, int(cfg["n-train"]), int(cfg["n-eval"]), int(cfg["seed"]),
                             int(cfg["batch-size"]), int(cfg["max-length"]))
    upload, loss = fed.local_update(loaders, int(cfg["local-steps"]), int(info["client-seed"]), client=domain)
    reply = ConfigRecord({"client": domain, "method": json.dumps(upload.method.to_dict()),
                          "base": json.dumps(upload.base), "n-examples": int(upload.n_examples), "loss": loss})
    return Message(RecordDict({"upload": ArrayRecord(wire_state(upload.tensors, fed.strategy)), "meta": reply}),
                   reply_to=msg)


# --- the server ---------------------------------------------------------------------------------

server_app = ServerApp()


def _nodes(grid: Grid, clients: tuple, wait_s: float) -> dict[str, int]:
    """domain -> node id, once a SuperNode of every client has connected (or a clear error)."""
    deadline, found = time.monotonic() + wait_s, {}
    while True:
        ids = [i for i in grid.get_node_ids() if i not in found.values()]
        if ids:
            msgs = [Message(RecordDict(), i, "query", group_id="hello") for i in ids]
            for reply in grid.send_and_receive(msgs, timeout=30):
                if reply.has_content():
                    found[str(reply.content["info"]["client"])] = reply.metadata.src_node_id
        if all(c in found for c in clients):
            return {c: found[c] for c in clients}
        if time.monotonic() > deadline:
            raise FederatedError(f"after {wait_s:.0f} s only these clients have connected: {sorted(found)}; "
                                 f"expected {list(clients)}. Start one SuperNode per client with "
                                 "--node-config 'client=\"<domain>\"'.")
        time.sleep(1.0)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = settings(context.run_config)
    clients, fed = cfg["clients"], federation(cfg)
    nodes = _nodes(grid, clients, float(cfg["wait-s"]))
    rounds = []
    for t in range(1, int(cfg["rounds"]) + 1):
        sampled, dropped = round_plan(t, clients, cfg["sample"], float(cfg["dropout"]), int(cfg["seed"]))
        content = {"state": ArrayRecord(wire_state(fed.state, fed.strategy)),
                   **{f"merged-{i}": ArrayRecord(m) for i, m in enumerate(fed.merged)}}
        msgs = []
        for i, c in enumerate(clients):
            if c in sampled and c not in dropped:
                conf = ConfigRecord({"round": t, "merged": len(fed.merged), "fresh-round": fed.fresh_round,
                                     "client-seed": client_seed(int(cfg["seed"]), t, i)})
                msgs.append(Message(RecordDict({**content, "config": conf}), nodes[c], "train", group_id=str(t)))
        replies = {}
        for reply in grid.send_and_receive(msgs):
            if not reply.has_content():
                raise FederatedError(f"round {t}: a client failed: {reply.error.reason}")
            meta = reply.content["meta"]
            tensors = reply.content["upload"].to_torch_state_dict()
            if fed.strategy == "ffa":  # A stayed home: it is the server's own seeded A
                tensors = {**{k: v for k, v in fed.state.items() if k not in tensors}, **tensors}
            replies[str(meta["client"])] = ClientState(tensors, Method.from_dict(json.loads(meta["method"])),
                                                       json.loads(meta["base"]), int(meta["n-examples"]))
        uploads = [replies[c] for c in clients if c in replies]  # the federation's order, as the simulator
        error = fed.server_round(uploads, t)
        rounds.append({"round": t, "trained": [c for c in clients if c in replies], "aggregation_error": error,
                       "bytes_up": sum(payload_bytes(u.tensors, fed.strategy) for u in uploads),
                       "bytes_down": fed.last_down})
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    write_tensors(out / "state.safetensors", fed.state, {"format": "pt"})
    for i, stacked in enumerate(fed.merged):  # FLoRA: what each round merged into the base
        write_tensors(out / f"merged-{i + 1}.safetensors", stacked, {"format": "pt"})
    write_json(out / "rounds.json", {"strategy": fed.strategy, "method": fed.method.to_dict(), "rounds": rounds})


# --- the app folder -------------------------------------------------------------------------------

def _toml(v) -> str:
    return json.dumps(v) if isinstance(v, str) else ("true" if v is True else "false" if v is False else repr(v))


def write_project(folder, **config) -> Path:
    """Write a Flower app folder for `flwr run`: pyproject.toml naming these apps, with the run
    config (DEFAULTS, with `config`'s keys written with dashes or underscores)."""
    cfg = dict(DEFAULTS)
    for k, v in config.items():
        key = k.replace("_", "-")
        if key not in DEFAULTS:
            raise FederatedError(f"unknown run config {k!r}; known: {sorted(DEFAULTS)}.")
        if key == "method" and isinstance(v, Method):
            v = json.dumps(v.to_dict())
        if key == "clients" and not isinstance(v, str):
            v = ",".join(v)
        if key == "ranks" and isinstance(v, dict):
            v = ",".join(f"{c}:{r}" for c, r in v.items())
        cfg[key] = v
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
             '[project]', 'name = "peftkit-federated"', 'version = "0.1.0"',
             'description = "peftkit federated adaptation on Flower"', 'license = "MIT"', 'dependencies = []', '',
             '[tool.flwr.app]', 'publisher = "peftkit"', '', '[tool.flwr.app.components]',
             'serverapp = "peftkit.studies.flower_app:server_app"',
             'clientapp = "peftkit.studies.flower_app:client_app"', '', '[tool.flwr.app.config]']
    lines += [f"{k} = {_toml(v)}" for k, v in cfg.items()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (folder / "README.md").write_text("A Flower app running peftkit's federated clients and server; "
                                      "see peftkit/studies/flower_app.py and docs/federated.md.\n")
    return folder


__all__ = ["DEFAULTS", "client_app", "server_app", "settings", "write_project"]
