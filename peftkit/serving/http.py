"""An HTTP service for a saved deployment: `python -m peftkit serve --deployment DIR --port N`.

FastAPI on uvicorn, over one `Deployer` loaded from DIR (written by `Deployer.save`):

    POST   /predict            {"texts": [...], "adapter": "name"} or {"texts": [...], "adapters": [...]}
                               -> {"predictions": [{"label", "probability", "adapter"}, ...]}, in order
    GET    /adapters           the registered adapters
    POST   /adapters           {"name", "path", "replace"}: register a folder on the server's disk
    DELETE /adapters/{name}    remove one                      (both: Authorization: Bearer <token>)
    POST   /feedback           {"request_id", "labels"}: true labels for an earlier /predict
    GET    /monitor            each adapter's rolling accuracy and holding alerts
    GET    /health             liveness, and "draining" after SIGTERM
    GET    /metrics            Prometheus text (prometheus-client)
    GET    /docs, /openapi.json

Dynamic batching. A request waits in a queue; one worker takes the first waiting request, gathers
whatever else arrives within `batch_wait_ms` (or until `max_batch` texts), and runs them all as one
mixed batch (`Deployer.predict(texts, adapters=...)`: one forward, each row with its adapter).
While that forward runs, the next batch gathers. A merged Deployer cannot mix, so there the batch
runs one forward per adapter.

Errors are JSON, `{"error": "<code>", "detail": ...}`, never a traceback: 413 for too many texts,
too long a text or too large a body; 422 for a malformed body; 404 for an unknown adapter (the
detail lists the registered ones); 401 without a token and 403 with a wrong one (or when no admin
token is set: then the service is read-only); 409 for a name already taken.

Registering or removing an adapter saves the deployment to DIR again, so a restart (after a crash
too) serves the same adapters and the same answers. SIGTERM drains: the service stops accepting
connections, answers every request already received, then exits.

The live `Monitor`s (one per adapter) are fed from traffic: each /predict answer carries an
`X-Request-ID` header; POST /feedback with that id and the true labels records those examples,
with their predictions, in their adapters' monitors. Alerts show in /metrics and /monitor.
"""


from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter as Tally
from collections import OrderedDict
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..files.adapter_file import AdapterFileError
from .api_schema import (
    TOKEN_ENV,
    ApiError,
    FeedbackRequest,
    PredictRequest,
    PredictResponse,
    RegisterRequest,
    ServiceConfig,
    error_docs,
)
from .batcher import Batcher, Metrics
from .deployer import NAME_RE, Deployer, UnknownAdapterError
from .mixed import BASE
from .monitor import Monitor, _clean

log = logging.getLogger("peftkit.serve")


# -- the service --------------------------------------------------------------------------------

class Service:
    """The state behind the app: the Deployer, its folder, the batcher, monitors and metrics."""

    def __init__(self, deployer: Deployer, directory, config: ServiceConfig):
        self.deployer, self.directory, self.config = deployer, Path(directory), config
        self.metrics = Metrics()
        self.batcher = Batcher(deployer, config.batch_wait_ms / 1000, config.max_batch, self.metrics)
        self.monitors: dict[str, Monitor] = {}
        self.recent: OrderedDict = OrderedDict()  # request id -> (texts, labels, probabilities, unk, adapters)
        self._recent_texts = 0
        self._lock = threading.Lock()  # the monitors and the recent requests
        self.admin_lock = asyncio.Lock()
        self.draining = False
        self.started = time.time()
        self.metrics.adapters.set(len(deployer.names()))

    def known(self) -> list[str]:
        return sorted(self.deployer.names())

    def unknown_adapter(self, names) -> ApiError:
        known = self.known()
        return ApiError(404, "unknown_adapter", {
            "message": f"no adapter named {', '.join(repr(n) for n in names)}; registered: {known or 'none yet'} "
                       f"(and {BASE!r} for the base alone).",
            "unknown": list(names), "adapters": known})

    def remember(self, request_id: str, frame) -> None:
        with self._lock:
            self.recent[request_id] = (frame["text"].tolist(), frame["label"].tolist(), frame["probability"].tolist(),
                                       frame["unk_rate"].tolist(), frame["adapter"].tolist())
            self._recent_texts += len(frame)
            while self._recent_texts > self.config.feedback_texts and len(self.recent) > 1:
                _, old = self.recent.popitem(last=False)
                self._recent_texts -= len(old[0])

    def feedback(self, request_id: str, labels: list) -> dict:
        with self._lock:
            if request_id not in self.recent:
                raise ApiError(404, "unknown_request", {
                    "message": f"no recent /predict answer has X-Request-ID {request_id!r}: it is wrong, its "
                               f"labels were already posted, or it is older than the last "
                               f"{self.config.feedback_texts} texts kept.", "request_id": request_id})
            texts, preds, probs, unk, names = self.recent[request_id]
            if len(labels) != len(texts):
                raise ApiError(422, "malformed_request", {
                    "message": f"that request had {len(texts)} texts but {len(labels)} labels were posted; "
                               "post one label per text (null where unknown).", "texts": len(texts)})
            if any(y is not None and not 0 <= y < self.deployer.num_labels for y in labels):
                raise ApiError(422, "malformed_request", {
                    "message": f"labels must be integers in [0, {self.deployer.num_labels}) or null."})
            del self.recent[request_id]
            self._recent_texts -= len(texts)
            raised = []
            for name in dict.fromkeys(names):
                idx = [i for i, n in enumerate(names) if n == name]
                mon = self.monitors.get(name)
                if mon is None:
                    mon = self.monitors[name] = Monitor(window=self.config.monitor_window, name=f"serve:{name}")
                new = mon.record([texts[i] for i in idx], [preds[i] for i in idx], [probs[i] for i in idx],
                                 [labels[i] for i in idx], unk_rates=[unk[i] for i in idx], tag=name)
                for a in new:
                    if a["kind"] != "recovered":
                        self.metrics.alerts.labels(name, a["kind"], a["statistic"]).inc()
                    raised.append(_clean({**a, "adapter": name}))
                self.metrics.holding.labels(name).set(len(mon.alerts(active_only=True)))
                acc = mon.frame()["accuracy"].iloc[-1]
                if isinstance(acc, float) and math.isfinite(acc):
                    self.metrics.accuracy.labels(name).set(acc)
                self.metrics.feedback.labels(name).inc(sum(labels[i] is not None for i in idx))
            return {"recorded": len(texts), "alerts": raised}

    def monitor_summary(self) -> dict:
        with self._lock:
            out = {}
            for name, mon in self.monitors.items():
                f = mon.frame()
                last = f.iloc[-1] if len(f) else None
                out[name] = _clean({"seen": mon.seen,
                                    "accuracy": float(last["accuracy"]) if last is not None else None,
                                    "labeled": int(last["labeled"]) if last is not None else 0,
                                    "alerts": [dict(r) for r in mon.alerts(active_only=True).to_dict("records")]})
            return out

    def save(self) -> None:
        self.deployer.save(self.directory)
        self.metrics.adapters.set(len(self.deployer.names()))


def create_app(deployer: Deployer, directory, config: ServiceConfig | None = None):
    """The ASGI app serving `deployer`, whose deployment folder is `directory`: the FastAPI app inside
    a guard that limits body sizes and counts requests (its attributes are the FastAPI app's; the
    state is at `.svc`)."""
    config = config or ServiceConfig()
    svc = Service(deployer, directory, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.batcher.start()
        try:
            yield
        finally:
            await svc.batcher.stop()

    app = FastAPI(
        title="peftkit serving", version=__version__, lifespan=lifespan,
        description=(
            f"Adapters on one {deployer.base} base, served with dynamic mixed batching. Limits: "
            f"{config.max_texts} texts per request, {config.max_chars} characters per text (413 beyond). "
            "Every error is JSON: {\"error\": code, \"detail\": ...}. POST and DELETE /adapters need "
            f"`Authorization: Bearer <token>` (the {TOKEN_ENV} environment variable or --token-file)."))
    app.state.service = svc
    bearer = HTTPBearer(auto_error=False, description="the admin token")

    def admin(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.admin_token is None:
            raise ApiError(403, "admin_disabled", f"this service was started without an admin token, so it is "
                           f"read-only; restart it with {TOKEN_ENV} set or --token-file.")
        if creds is None:
            raise ApiError(401, "missing_token", "this endpoint needs the header 'Authorization: Bearer <token>'.",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(creds.credentials.encode(), config.admin_token.encode()):
            raise ApiError(403, "wrong_token", "the bearer token is not the admin token.")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse({"error": e.error, "detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _malformed(request, e: RequestValidationError):
        detail = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()]
        return JSONResponse({"error": "malformed_request", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status_code, f"http_{e.status_code}")
        return JSONResponse({"error": code, "detail": e.detail}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal_error",
                             "detail": f"the server failed on this request ({type(e).__name__}); its log has the details."},
                            status_code=500)

    @app.post("/predict", response_model=PredictResponse, tags=["predict"],
              responses={**error_docs(404, "unknown_adapter"), **error_docs(413, "too_many_texts, text_too_long, body_too_large"),
                         **error_docs(422, "malformed_request")},
              summary="Classify texts with one adapter, or one adapter per text")
    async def predict(body: PredictRequest):
        """Answers `{"predictions": [{"label", "probability", "adapter"}, ...]}` in the texts' order, the
        same labels and probabilities as `Deployer.predict`. The `X-Request-ID` header of the answer is
        what POST /feedback takes."""
        t0 = time.perf_counter()
        names = body.names()
        distinct = set(names)
        label = names[0] if len(distinct) == 1 else "(mixed)" if names else "(none)"
        unknown = sorted(distinct - set(svc.deployer.names()) - {BASE})
        try:
            if unknown:
                label = "(unknown)"
                raise svc.unknown_adapter(unknown)
            if len(body.texts) > config.max_texts:
                raise ApiError(413, "too_many_texts", {
                    "message": f"{len(body.texts)} texts in one request; the limit is {config.max_texts}. "
                               "Split them over several requests.", "texts": len(body.texts), "limit": config.max_texts})
            long = [(i, len(t)) for i, t in enumerate(body.texts) if len(t) > config.max_chars]
            if long:
                raise ApiError(413, "text_too_long", {
                    "message": f"texts[{long[0][0]}] has {long[0][1]} characters; the limit is {config.max_chars} "
                               "(the model reads its first 128 word pieces anyway). Shorten it.",
                    "index": long[0][0], "chars": long[0][1], "limit": config.max_chars})
            if not body.texts:
                svc.metrics.requests.labels(label, "200").inc()
                return JSONResponse({"predictions": []}, headers={"X-Request-ID": uuid.uuid4().hex})
            svc.metrics.inflight.inc()
            try:
                frame = await svc.batcher.predict(list(body.texts), names)
            except UnknownAdapterError:
                raise svc.unknown_adapter(sorted(set(names) - set(svc.deployer.names()) - {BASE})) from None
            finally:
                svc.metrics.inflight.dec()
        except ApiError as e:
            svc.metrics.requests.labels(label, str(e.status)).inc()
            raise
        request_id = uuid.uuid4().hex
        svc.remember(request_id, frame)
        preds = [{"label": int(y), "probability": float(p), "adapter": a}
                 for y, p, a in zip(frame["label"].tolist(), frame["probability"].tolist(), frame["adapter"].tolist())]
        for a, k in Tally(names).items():
            svc.metrics.texts.labels(a).inc(k)
        svc.metrics.requests.labels(label, "200").inc()
        svc.metrics.latency.labels(label).observe(time.perf_counter() - t0)
        return JSONResponse({"predictions": preds}, headers={"X-Request-ID": request_id})

    @app.get("/adapters", tags=["adapters"], summary="The registered adapters")
    async def adapters():
        rows = svc.deployer.adapters().to_dict("records")
        return {"adapters": [_clean(r) for r in rows], "merged": svc.deployer.merged, "base": svc.deployer.base}

    @app.post("/adapters", status_code=201, tags=["adapters"], dependencies=[Depends(admin)],
              summary="Register an adapter folder on the server's disk (admin)",
              responses={**error_docs(401, "missing_token"), **error_docs(403, "wrong_token, admin_disabled"),
                         **error_docs(409, "adapter_exists"), **error_docs(422, "malformed_request, bad_name, adapter_rejected")})
    async def register(body: RegisterRequest):
        """Checks the adapter against the base (as `Deployer.register`), serves it from the next request
        on, and saves the deployment so a restart keeps it."""
        if not NAME_RE.match(body.name):
            raise ApiError(422, "bad_name", f"adapter name {body.name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                           "starting with a letter or digit.")
        async with svc.admin_lock:
            if body.name in svc.deployer.names() and not body.replace:
                raise ApiError(409, "adapter_exists", {"message": f"an adapter named {body.name!r} is already "
                               "registered; pass \"replace\": true to swap it, or pick another name.",
                               "adapters": svc.known()})
            loop = asyncio.get_running_loop()
            try:
                row = await loop.run_in_executor(None, lambda: svc.deployer.register(body.name, body.path, replace=body.replace))
            except (AdapterFileError, FileNotFoundError, ValueError) as e:
                raise ApiError(422, "adapter_rejected", f"{body.path}: {e}") from None
            await loop.run_in_executor(None, svc.save)
        return _clean(row)

    @app.delete("/adapters/{name}", tags=["adapters"], dependencies=[Depends(admin)],
                summary="Remove an adapter (admin)",
                responses={**error_docs(401, "missing_token"), **error_docs(403, "wrong_token, admin_disabled"),
                           **error_docs(404, "unknown_adapter")})
    async def unregister(name: str):
        async with svc.admin_lock:
            if name not in svc.deployer.names():
                raise svc.unknown_adapter([name])
            svc.deployer.unregister(name)
            await asyncio.get_running_loop().run_in_executor(None, svc.save)
        return {"deleted": name, "adapters": svc.known()}

    @app.post("/feedback", tags=["monitor"], summary="True labels for an earlier /predict answer",
              responses={**error_docs(404, "unknown_request"), **error_docs(422, "malformed_request")})
    async def feedback(body: FeedbackRequest):
        """Records that request's texts, predictions and these labels in each adapter's Monitor; answers
        the alerts this raised (or resolved)."""
        return svc.feedback(body.request_id, body.labels)

    @app.get("/monitor", tags=["monitor"], summary="Each adapter's rolling accuracy and holding alerts")
    async def monitor():
        return svc.monitor_summary()

    @app.get("/health", tags=["service"], summary="Liveness", responses=error_docs(503, "draining"))
    async def health():
        body = {"status": "draining" if svc.draining else "ok", "base": svc.deployer.base,
                "device": str(svc.deployer.device), "adapters": len(svc.deployer.names()),
                "merged": svc.deployer.merged, "version": __version__, "uptime_s": round(time.time() - svc.started, 3)}
        return JSONResponse(body, status_code=503 if svc.draining else 200)

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=Response)
    async def metrics():
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return _Guard(app, svc)


class _BodyTooLarge(StarletteHTTPException):
    """A body over the limit: raised while it is read, answered 413 (FastAPI re-raises HTTP errors)."""

    def __init__(self, limit: int, config: ServiceConfig):
        super().__init__(413, {"message": f"the request body is over {limit} bytes, more than {config.max_texts} "
                                          f"texts of {config.max_chars} characters can take.", "limit": limit})


class _Guard:
    """The outermost ASGI layer: refuses bodies over the limit (413) before they are read whole,
    and counts every request by endpoint and status. Attributes pass through to the FastAPI app."""

    def __init__(self, app: FastAPI, svc: Service):
        self.app, self.svc = app, svc

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.svc.config.max_body_bytes
        status = {"code": 500, "started": False}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit, self.svc.config)
            return message
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise _BodyTooLarge(limit, self.svc.config)
            await self.app(scope, limited_receive, counted_send)
        except _BodyTooLarge as e:  # refused before the app saw it (the header said so)
            if not status["started"]:
                body = json.dumps({"error": "body_too_large", "detail": e.detail}).encode()
                await counted_send({"type": "http.response.start", "status": 413,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "(unmatched)"
            self.svc.metrics.http.labels(endpoint, str(status["code"])).inc()
