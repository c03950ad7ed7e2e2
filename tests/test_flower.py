"""The federation on Flower's own engine: a SuperLink and two SuperNodes on 127.0.0.1, started
with Flower's commands, run peftkit's ClientApp and ServerApp on the tiny BERT, two rounds each of
FLoRA (client ranks 8 and 4) and of FFA-LoRA (a client dropping out of round 1; A never sent);
the aggregated adapters must equal the in-process simulator's with the same seeds.

Runs once: the fixture starts the engine once for both runs (a few minutes on a busy 2-core
machine). Every process started here, and every process they start, is ended afterwards,
whatever happened. Skipped, saying why, only when flwr is not installed."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

flwr = pytest.importorskip("flwr", reason="flwr is not installed: pip install 'peftkit[federated]' (or flwr==1.42.*)")

from peftkit.studies.federated_sim import simulate_federated  # noqa: E402
from peftkit.studies.flower_app import write_project  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMON = dict(rounds=2, local_steps=2, clients=("movies", "amazon"), base="tiny", n_train=32, n_eval=16)
RUNS = {  # two runs on one SuperLink and its SuperNodes
    "flora": dict(COMMON, strategy="flora", seed=0, ranks={"amazon": 4}),  # different ranks per client
    "ffa": dict(COMMON, strategy="ffa", seed=8, dropout=0.5),  # seed 8: amazon drops out of round 1, A never sent
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the SuperLink did not listen on 127.0.0.1:{port} within {timeout} s")


def stop(procs) -> None:
    """End every process started here and all their descendants: the SuperLink starts
    flower-superexec in a session of its own, so a process group alone would miss it. SIGTERM
    first, SIGKILL for whatever is left after 15 s."""
    import psutil  # ipykernel's dependency, so always here
    family = []
    for p in procs:
        try:
            me = psutil.Process(p.pid)
            family += [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for q in family:
        try:
            q.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for q in alive:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for p in procs:
        p.wait()


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    if not (BIN / "flower-superlink").exists():
        pytest.skip(f"flwr is importable but its commands are not in {BIN}")
    tmp = tmp_path_factory.mktemp("flower")
    port = free_port()
    home, out = tmp / "flwr-home", tmp / "out"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "peftkit"\n\n[superlink.peftkit]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    for name, settings in RUNS.items():
        write_project(tmp / f"app-{name}", out=str(out / name), **settings)
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    logs, procs = {}, []

    def start(name, *args):
        logs[name] = open(tmp / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=tmp, env=env, stdout=logs[name],
                                      stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    try:
        link = start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                     "--port", str(port))
        wait_for_port(port, link)
        for client in COMMON["clients"]:
            start(f"supernode-{client}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                  "--port", str(free_port()), "--node-config", f'client="{client}"')
        runs = {name: subprocess.run([str(BIN / "flwr"), "run", str(tmp / f"app-{name}"), "peftkit", "--stream"],
                                     cwd=tmp, env=env, capture_output=True, text=True, timeout=300) for name in RUNS}
    finally:
        stop(procs)
        for f in logs.values():
            f.close()
    for name, run in runs.items():
        if not (out / name / "rounds.json").exists():
            tails = "\n".join(f"--- {n}:\n" + (tmp / f"{n}.log").read_text()[-1500:] for n in logs)
            pytest.fail(f"the Flower {name} run wrote no result (flwr run rc={run.returncode}):\n{run.stdout[-2000:]}"
                        f"\n{run.stderr[-1000:]}\n{tails}")
    return out


def same_rounds(out: Path, df) -> list:
    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    sim = df[df["round"] > 0].groupby("round")
    assert [r["trained"] for r in rounds] == [list(g.loc[g.trained, "client"]) for _, g in sim]
    errors = df.drop_duplicates("round").set_index("round")["aggregation_error"]
    for r in rounds:
        assert r["aggregation_error"] == pytest.approx(errors[r["round"]], abs=1e-9) and r["aggregation_error"] < 1e-6
    final = load_file(out / "state.safetensors")
    fed = df.attrs["federation"]
    assert set(final) == set(fed.state)
    for k, v in fed.state.items():
        assert torch.allclose(final[k], v, atol=1e-6, rtol=0), k
    return rounds


def test_flower_flora_equals_the_in_process_simulator(flower_run):
    df = simulate_federated(**RUNS["flora"], progress=False)
    rounds = same_rounds(flower_run / "flora", df)
    assert [r["trained"] for r in rounds] == [["movies", "amazon"]] * 2
    fed = df.attrs["federation"]
    assert len(fed.merged) == 2
    for t, stacked in enumerate(fed.merged, 1):
        got = load_file(flower_run / "flora" / f"merged-{t}.safetensors")
        assert set(got) == set(stacked) and any(k.endswith("lora_B") for k in got)
        for k, v in stacked.items():
            assert torch.allclose(got[k], v, atol=1e-6, rtol=0), (t, k)
        assert got[next(k for k in got if k.endswith("lora_A"))].shape[0] == 8 + 4  # the two clients' ranks stacked


def test_flower_ffa_with_a_dropout_equals_the_in_process_simulator(flower_run):
    df = simulate_federated(**RUNS["ffa"], progress=False)
    rounds = same_rounds(flower_run / "ffa", df)
    assert [r["trained"] for r in rounds] == [["movies"], ["movies", "amazon"]]  # amazon dropped out of round 1
    fed = df.attrs["federation"]
    first = load_file(flower_run / "ffa" / "state.safetensors")
    b = next(k for k in fed.state if k.endswith("lora_B"))
    assert first[b].abs().sum() > 0  # B trained
    assert rounds[1]["bytes_up"] == 2 * sum(v.numel() * 4 for k, v in fed.state.items() if not k.endswith("lora_A"))
