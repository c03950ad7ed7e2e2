"""The HTTP service over real HTTP on 127.0.0.1: `python -m peftkit serve` in a subprocess, its
answers against the in-process Deployer's, every limit and error code, the admin token, the monitor
fed by /feedback, a bounded concurrent load, a kill mid-load and a restart, and a SIGTERM drain.

The server starts twice for the whole module (about ten seconds each, mostly imports): the heavy
checks run once, not per parameter."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import peftkit as pk
from peftkit.serving.deployer import Deployer
from peftkit.serving.api_schema import ServiceConfig
from peftkit.serving.batcher import parse_metrics
from peftkit.serving.mixed import BASE
from conftest import perturb

httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-admin-token-7f3a"
LIMITS = {"max_texts": 8, "max_chars": 300}
TEXTS = ["a wonderful, moving film", "dull and far too long", "", "not bad at all", "the plot? what plot",
         "i loved every minute of it", "meh", "an utter waste of two hours", "great phone, awful battery",
         "late again, thanks a lot"]


def make_adapter(path, method, seed):
    model, _ = pk.load_base("tiny", seed=0)
    pk.apply(model, method)
    perturb(model, seed=seed, std=0.3)
    pk.save_adapter(model, path)
    return path


class Server:
    """`python -m peftkit serve` in a subprocess; `url` once it listens."""

    def __init__(self, deployment, token_file, *extra):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop(TOKEN_ENV_NAME, None)
        cmd = [sys.executable, "-m", "peftkit", "serve", "--deployment", str(deployment), "--port", "0",
               "--threads", "1", "--token-file", str(token_file), "--max-texts", str(LIMITS["max_texts"]),
               "--max-chars", str(LIMITS["max_chars"]), "--monitor-window", "20", *extra]
        self.log = tempfile.TemporaryFile("w+")  # stderr: a file, so a chatty server never blocks on a full pipe
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT)
        line = self.proc.stdout.readline()  # blocks until the server listens (or dies)
        if not line:
            self.proc.wait(30)
            self.log.seek(0)
            raise RuntimeError(f"the server did not start: {self.log.read()[-3000:]}")
        self.info = json.loads(line)
        self.url = self.info["url"]

    def client(self, **kw):
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.log.seek(0)
        assert "Traceback" not in self.log.read()  # nothing failed inside the server either


TOKEN_ENV_NAME = "PEFTKIT_ADMIN_TOKEN"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved deployment of four adapters (both families), an extra adapter folder, the token file,
    and the same deployment loaded in this process: the reference answers."""
    d = tmp_path_factory.mktemp("http")
    dep = Deployer("tiny", device="cpu")
    methods = {"lora_a": pk.LoRA(r=4, alpha=8), "lora_b": pk.LoRA(r=2, alpha=8, targets=("query", "key", "value")),
               "pfeiffer": pk.Adapter(size=8), "hybrid": pk.Hybrid(lora=pk.LoRA(r=2, alpha=4), adapter=pk.Adapter(size=4))}
    for i, (name, method) in enumerate(methods.items()):
        dep.register(name, make_adapter(d / "src" / name, method, seed=i + 1))
    dep.save(d / "deployment")
    extra = make_adapter(d / "src" / "extra", pk.Adapter(size=4, placement="houlsby"), seed=9)
    (d / "token").write_text(TOKEN + "\n")
    return {"dir": d, "deployment": d / "deployment", "extra": extra, "token": d / "token", "local": dep}


@pytest.fixture(scope="module")
def server(setup):
    s = Server(setup["deployment"], setup["token"])
    yield s
    s.stop()


def expected(local, texts, names):
    df = local.predict(texts, adapters=names)
    return list(zip(df["label"].tolist(), df["probability"].tolist(), df["adapter"].tolist()))


def assert_same(answer, want):
    got = answer["predictions"]
    assert len(got) == len(want)
    for g, (label, prob, adapter) in zip(got, want):
        assert set(g) == {"label", "probability", "adapter"}  # the wire format, exactly
        assert g["label"] == label and g["adapter"] == adapter
        assert abs(g["probability"] - prob) <= 1e-5


def assert_error(r, status, error):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == error, body
    assert "Traceback" not in r.text
    return body["detail"]


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_answers_equal_the_in_process_deployers(server, setup):
    local = setup["local"]
    rng = np.random.default_rng(0)
    with server.client() as c:
        r = c.post("/predict", json={"texts": TEXTS[:6], "adapter": "pfeiffer"})
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32
        assert_same(r.json(), expected(local, TEXTS[:6], ["pfeiffer"] * 6))
        for _ in range(4):  # mixed, in random orders, the bare base included
            names = list(rng.choice(local.names() + [BASE], size=8))
            r = c.post("/predict", json={"texts": TEXTS[:8], "adapters": names})
            assert_same(r.json(), expected(local, TEXTS[:8], names))
        assert c.post("/predict", json={"texts": [], "adapter": "lora_a"}).json() == {"predictions": []}
        listed = c.get("/adapters").json()
    assert [a["name"] for a in listed["adapters"]] == local.names() and listed["base"] == "tiny"


def test_every_limit_and_error_is_json_with_its_code(server, setup):
    n, chars = LIMITS["max_texts"], LIMITS["max_chars"]
    with server.client() as c:
        d = assert_error(c.post("/predict", json={"texts": ["x"] * (n + 1), "adapter": "lora_a"}), 413, "too_many_texts")
        assert d["limit"] == n and str(n) in d["message"]
        d = assert_error(c.post("/predict", json={"texts": ["ok", "y" * (chars + 1)], "adapter": "lora_a"}), 413, "text_too_long")
        assert d["index"] == 1 and d["chars"] == chars + 1
        big = json.dumps({"texts": ["z" * 5000] * 40, "adapter": "lora_a"}).encode()
        assert_error(c.post("/predict", content=big, headers={"content-type": "application/json"}), 413, "body_too_large")
        chunks = (b'{"texts": ["' + b"w" * 20000 + b'"]' for _ in range(10))  # no content-length: chunked
        assert_error(c.post("/predict", content=chunks, headers={"content-type": "application/json"}), 413, "body_too_large")
        for bad in ['{oops', '{"texts": "one string", "adapter": "lora_a"}', '{"texts": [1, 2], "adapter": "lora_a"}',
                    '{"adapter": "lora_a"}', '{"texts": ["a"]}', '{"texts": ["a"], "adapter": "lora_a", "adapters": ["lora_a"]}',
                    '{"texts": ["a", "b"], "adapters": ["lora_a"]}', '{"texts": ["a"], "adapter": "lora_a", "text": "typo"}',
                    '[]', '']:
            assert_error(c.post("/predict", content=bad, headers={"content-type": "application/json"}), 422, "malformed_request")
        d = assert_error(c.post("/predict", json={"texts": ["a", "b"], "adapters": ["lora_a", "tweets"]}), 404, "unknown_adapter")
        assert d["unknown"] == ["tweets"] and d["adapters"] == sorted(setup["local"].names()) and "lora_a" in d["message"]
        assert_error(c.get("/nothing/here"), 404, "not_found")
        assert_error(c.put("/predict", json={}), 405, "method_not_allowed")
        assert_error(c.delete("/adapters/tweets", headers=AUTH), 404, "unknown_adapter")


def test_adapter_changes_need_the_token_and_are_served_at_once(server, setup):
    body = {"name": "extra", "path": str(setup["extra"])}
    with server.client() as c:
        r = c.post("/adapters", json=body)
        assert_error(r, 401, "missing_token")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(c.post("/adapters", json=body, headers={"Authorization": "Bearer wrong"}), 403, "wrong_token")
        assert_error(c.post("/adapters", json=body, headers={"Authorization": f"Basic {TOKEN}"}), 401, "missing_token")
        assert_error(c.delete("/adapters/lora_a"), 401, "missing_token")
        assert_error(c.delete("/adapters/lora_a", headers={"Authorization": "Bearer nope"}), 403, "wrong_token")
        r = c.post("/adapters", json=body, headers=AUTH)
        assert r.status_code == 201 and r.json()["name"] == "extra"
        assert_error(c.post("/adapters", json=body, headers=AUTH), 409, "adapter_exists")
        assert_error(c.post("/adapters", json={**body, "name": "../x"}, headers=AUTH), 422, "bad_name")
        assert_error(c.post("/adapters", json={"name": "ghost", "path": str(setup["dir"] / "nowhere")}, headers=AUTH),
                     422, "adapter_rejected")
        assert_error(c.post("/adapters", json={"name": "ghost"}, headers=AUTH), 422, "malformed_request")
        setup["local"].register("extra", setup["extra"])
        names = ["extra", "lora_a", "extra", BASE]
        assert_same(c.post("/predict", json={"texts": TEXTS[:4], "adapters": names}).json(),
                    expected(setup["local"], TEXTS[:4], names))
        assert c.post("/adapters", json={"name": "temp", "path": str(setup["extra"])}, headers=AUTH).status_code == 201
        r = c.delete("/adapters/temp", headers=AUTH)
        assert r.status_code == 200 and "temp" not in r.json()["adapters"]
        assert_error(c.post("/predict", json={"texts": ["x"], "adapter": "temp"}), 404, "unknown_adapter")
    saved = json.loads((setup["deployment"] / "manifest.json").read_text())
    assert [a["name"] for a in saved["adapters"]] == setup["local"].names()  # saved at once


def test_feedback_feeds_the_monitor_and_metrics_show_it(server, setup):
    local = setup["local"]
    with server.client() as c:
        ids, wrong = [], []
        for k in range(3):  # 24 texts, every label wrong: the degradation alert must fire (window 20)
            texts = [f"{t} {k}" for t in TEXTS[:8]]
            r = c.post("/predict", json={"texts": texts, "adapter": "lora_b"})
            ids.append(r.headers["x-request-id"])
            wrong.append([1 - p["label"] for p in r.json()["predictions"]])
        alerts = []
        for rid, labels in zip(ids, wrong):
            r = c.post("/feedback", json={"request_id": rid, "labels": labels})
            assert r.status_code == 200 and r.json()["recorded"] == 8
            alerts += r.json()["alerts"]
        assert any(a["kind"] == "degradation" and a["adapter"] == "lora_b" for a in alerts)
        assert_error(c.post("/feedback", json={"request_id": ids[0], "labels": wrong[0]}), 404, "unknown_request")
        r = c.post("/predict", json={"texts": TEXTS[:2], "adapters": ["lora_a", "pfeiffer"]})
        rid = r.headers["x-request-id"]
        assert_error(c.post("/feedback", json={"request_id": rid, "labels": [1]}), 422, "malformed_request")
        assert_error(c.post("/feedback", json={"request_id": rid, "labels": [1, 7]}), 422, "malformed_request")
        assert c.post("/feedback", json={"request_id": rid, "labels": [1, None]}).json()["recorded"] == 2
        mon = c.get("/monitor").json()
        assert mon["lora_b"]["accuracy"] == 0 and mon["lora_b"]["seen"] == 24 and mon["lora_b"]["alerts"]
        m = parse_metrics(c.get("/metrics").text)
    def value(metric, **labels):
        rows = m[m["metric"] == metric]
        for k, v in labels.items():
            rows = rows[rows[k] == v]
        return rows["value"].sum()
    assert value("peftkit_monitor_alerts_total", adapter="lora_b", kind="degradation") >= 1
    assert value("peftkit_monitor_alerts_active", adapter="lora_b") >= 1
    assert value("peftkit_monitor_accuracy", adapter="lora_b") == 0
    assert value("peftkit_predict_requests_total", adapter="lora_b", status="200") == 3
    assert value("peftkit_predict_texts_total", adapter="lora_b") >= 24  # and its rows of mixed requests
    assert value("peftkit_predict_latency_seconds_count", adapter="lora_b") == 3
    assert value("peftkit_predict_requests_total", adapter="(unknown)", status="404") >= 1
    assert value("peftkit_batch_texts_count") >= 1 and value("peftkit_http_requests_total", endpoint="/feedback") >= 5
    assert value("peftkit_adapters") == len(local.names())


def test_openapi_documents_the_service(server):
    with server.client() as c:
        spec = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
        health = c.get("/health").json()
    assert health["status"] == "ok" and health["base"] == "tiny"
    assert {"/predict", "/adapters", "/adapters/{name}", "/feedback", "/health", "/metrics", "/monitor"} <= set(spec["paths"])
    post = spec["paths"]["/predict"]["post"]
    assert {"200", "404", "413", "422"} <= set(post["responses"])
    assert post["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    schemas = spec["components"]["schemas"]
    assert {"texts", "adapter", "adapters"} <= set(schemas["PredictRequest"]["properties"])
    assert set(schemas["Prediction"]["properties"]) == {"label", "probability", "adapter"}
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert spec["paths"]["/adapters"]["post"]["security"] and spec["paths"]["/adapters/{name}"]["delete"]["security"]


def load(url, plans, clients=16):
    """`clients` threads, each sending its plan's requests one after another; returns
    (client, request index, status, json or error) for every request."""
    out = []
    lock = threading.Lock()

    def run(k):
        with httpx.Client(base_url=url, timeout=60) as c:
            for i, (texts, names) in enumerate(plans[k]):
                try:
                    r = c.post("/predict", json={"texts": texts, "adapters": names})
                    row = (k, i, r.status_code, r.json())
                except httpx.HTTPError as e:
                    row = (k, i, None, repr(e))
                with lock:
                    out.append(row)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    return out


def plans(names, clients, per_client, seed):
    rng = np.random.default_rng(seed)
    return [[([f"{TEXTS[rng.integers(len(TEXTS))]} #{k}.{i}" for _ in range(n)], list(rng.choice(names, size=n)))
             for i, n in enumerate(rng.integers(1, 4, size=per_client))] for k in range(clients)]


def test_concurrent_load_every_request_gets_its_own_answer(server, setup):
    local = setup["local"]
    work = plans(local.names() + [BASE], clients=16, per_client=50, seed=1)
    t0 = time.perf_counter()
    done = load(server.url, work)
    took = time.perf_counter() - t0
    assert len(done) == 16 * 50 and all(status == 200 for _, _, status, _ in done), \
        [row for row in done if row[2] != 200][:3]
    texts = [t for k, i, _, _ in done for t in work[k][i][0]]
    names = [n for k, i, _, _ in done for n in work[k][i][1]]
    want = iter(expected(local, texts, names))
    for k, i, _, answer in done:  # each answer is its own request's, in its texts' order
        assert_same(answer, [next(want) for _ in work[k][i][0]])
    with server.client() as c:
        m = parse_metrics(c.get("/metrics").text)
    batches = m[m["metric"] == "peftkit_batch_requests_count"]["value"].sum()
    gathered = m[m["metric"] == "peftkit_batch_requests_sum"]["value"].sum()
    assert gathered / batches > 1.5, (gathered, batches)  # dynamic batching gathered concurrent requests
    print(f"\n16 clients x 50 requests in {took:.1f}s; {gathered / batches:.1f} requests per forward")


def test_kill_mid_load_restart_then_sigterm_drains(server, setup):
    local = setup["local"]
    before = local.names()
    work = plans(before, clients=8, per_client=200, seed=2)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("done", load(server.url, work, clients=8)))
    t.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGKILL)  # mid-load, no goodbye
    t.join(120)
    done = result["done"]
    assert any(s == 200 for _, _, s, _ in done) and any(s is None for _, _, s, _ in done)  # it really was mid-load
    again = Server(setup["deployment"], setup["token"], "--batch-wait-ms", "1500")
    try:
        assert again.info["adapters"] == before  # every adapter, the one added over HTTP included
        with again.client() as c:
            names = (before + [BASE]) * 2
            assert_same(c.post("/predict", json={"texts": TEXTS[:8], "adapters": names[:8]}).json(),
                        expected(local, TEXTS[:8], names[:8]))
        # SIGTERM while six requests wait for their batch (1.5 s): each is answered, then it exits.
        answers = []

        def send(i):
            try:
                answers.append(httpx.post(f"{again.url}/predict", timeout=60,
                                          json={"texts": [TEXTS[i]], "adapter": before[i % len(before)]}))
            except httpx.HTTPError as e:  # counted below
                answers.append(e)
        senders = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for s in senders:
            s.start()
        with again.client() as c:
            for _ in range(200):  # until all six are in the server's hands
                m = parse_metrics(c.get("/metrics").text)
                if m[m["metric"] == "peftkit_inflight_requests"]["value"].sum() == 6:
                    break
                time.sleep(0.02)
        again.proc.send_signal(signal.SIGTERM)
        for s in senders:
            s.join(60)
        assert len(answers) == 6 and all(getattr(r, "status_code", r) == 200 for r in answers), answers
        assert again.proc.wait(30) == 0
        assert json.loads(again.proc.stdout.readline())["event"] == "stopped"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{again.url}/health", timeout=5)
    finally:
        again.stop()


def test_service_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="max_texts"):
        ServiceConfig(max_texts=0)
    with pytest.raises(ValueError, match="batch_wait_ms"):
        ServiceConfig(batch_wait_ms=-1)
    with pytest.raises(ValueError, match="batch_wait_ms"):
        ServiceConfig(batch_wait_ms=60_000)
    with pytest.raises(ValueError, match="empty"):
        ServiceConfig(admin_token="  ")


def test_serve_without_a_deployment_says_what_to_do(tmp_path, capsys):
    from peftkit import cli
    assert cli.main(["serve", "--deployment", str(tmp_path / "none"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no deployment" in err and "--base" in err and "Traceback" not in err


def test_bench_serve_mixed_quick(tmp_path):
    """benchmarks/bench_serve.py --mixed end to end on the tiny model (service in a thread); no timing asserted."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_serve
    ratios, latency = bench_serve.mixed_suite("tiny", threads=1, quick=True, out_dir=tmp_path, server="thread")
    assert len(ratios) == 5 and (ratios["ratio"] > 0).all() and ratios["cpu"].iloc[0]
    checks = ratios.set_index("comparison")["check_max_abs_diff"].dropna()
    assert (checks < 1e-4).all(), checks  # the compared sides computed the same answers
    assert list(latency["clients"]) == [1, 4, 16] and (latency["p99_ms"] >= latency["p50_ms"]).all()
    assert (tmp_path / "serve_mixed.csv").exists() and (tmp_path / "serve_latency.csv").exists()


def test_a_merged_deployment_answers_mixed_requests_one_adapter_at_a_time(setup, tmp_path):
    """Merged mode cannot mix in one forward; the service runs one forward per adapter instead."""
    from peftkit.serving.server import BackgroundServer
    merged = Deployer("tiny", device="cpu", merged=True)
    for name in ("lora_a", "lora_b"):
        merged.register(name, setup["dir"] / "src" / name)
    merged.save(tmp_path / "merged")
    names = ["lora_b", "lora_a", "lora_a", "lora_b"]
    want = [(int(df["label"].iloc[0]), float(df["probability"].iloc[0]), n) for df, n in
            ((setup["local"].predict([t], adapter=n), n) for t, n in zip(TEXTS[:4], names))]
    with BackgroundServer(merged, tmp_path / "merged") as bg, httpx.Client(base_url=bg.url, timeout=60) as c:
        assert_same(c.post("/predict", json={"texts": TEXTS[:4], "adapters": names}).json(), want)
        assert c.get("/adapters").json()["merged"] is True
