"""Dynamic batching for the HTTP service, and its Prometheus metrics.

A request waits in a queue; one worker takes the first waiting request, gathers whatever else
arrives within `wait_s` (or until `max_batch` texts), and runs them all as one mixed batch in a
worker thread, so the event loop keeps accepting requests while the model computes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .deployer import Deployer, MixedBatchError, UnknownAdapterError
from .mixed import BASE


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (several services per process work)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.http = Counter("peftkit_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.requests = Counter("peftkit_predict_requests", "/predict requests by adapter ('(mixed)': several in one "
                                "request) and status", ["adapter", "status"], registry=r)
        self.latency = Histogram("peftkit_predict_latency_seconds", "/predict latency by adapter", ["adapter"], registry=r,
                                 buckets=(.002, .005, .01, .025, .05, .075, .1, .15, .25, .5, .75, 1, 2.5, 5, 10))
        self.texts = Counter("peftkit_predict_texts", "texts classified, by adapter", ["adapter"], registry=r)
        self.batch_texts = Histogram("peftkit_batch_texts", "texts per forward (dynamic batching)", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = Histogram("peftkit_batch_requests", "requests gathered per forward", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("peftkit_batch_seconds", "seconds per batch forward (tokenizing included)",
                                       registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.alerts = Counter("peftkit_monitor_alerts", "monitor alerts raised, by adapter, kind and statistic",
                              ["adapter", "kind", "statistic"], registry=r)
        self.holding = Gauge("peftkit_monitor_alerts_active", "monitor alerts holding now, by adapter", ["adapter"], registry=r)
        self.accuracy = Gauge("peftkit_monitor_accuracy", "rolling accuracy of the labelled feedback, by adapter",
                              ["adapter"], registry=r)
        self.feedback = Counter("peftkit_feedback_labels", "true labels received, by adapter", ["adapter"], registry=r)
        self.adapters = Gauge("peftkit_adapters", "adapters registered", registry=r)
        self.inflight = Gauge("peftkit_inflight_requests", "/predict requests received and not yet answered", registry=r)



def parse_metrics(text: str) -> pd.DataFrame:
    """Prometheus text (GET /metrics) as a DataFrame: metric, labels..., value. For notebooks and tests."""
    from prometheus_client.parser import text_string_to_metric_families
    rows = [{"metric": s.name, **s.labels, "value": s.value}
            for fam in text_string_to_metric_families(text) for s in fam.samples]
    return pd.DataFrame(rows)



@dataclass
class _Pending:
    texts: list[str]
    names: list[str]
    future: asyncio.Future
    arrived: float


@dataclass
class Batcher:
    """Gathers concurrent /predict requests into mixed batches and runs them one at a time in a
    worker thread, so the event loop keeps accepting requests while the model computes."""

    deployer: Deployer
    wait_s: float
    max_batch: int
    metrics: Metrics
    _queue: asyncio.Queue | None = None
    _task: asyncio.Task | None = None
    _carry: list = field(default_factory=list)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="peftkit-predict"))

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def predict(self, texts: list[str], names: list[str]):
        """The Deployer's frame rows for these texts, computed in some batch."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(texts, names, future, time.monotonic()))
        return await future

    async def _next(self, timeout: float | None):
        if self._carry:
            return self._carry.pop(0)
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()  # QueueEmpty when nothing waits
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _loop(self) -> None:
        while True:
            batch = [await self._next(None)]
            size = len(batch[0].texts)
            deadline = batch[0].arrived + self.wait_s
            while size < self.max_batch:
                try:
                    item = await self._next(deadline - time.monotonic())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if size + len(item.texts) > self.max_batch:
                    self._carry.append(item)  # first in the next batch
                    break
                batch.append(item)
                size += len(item.texts)
            try:
                await self._run(batch)
            except Exception as e:  # never let the loop die; each waiting request gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)

    async def _run(self, batch: list[_Pending]) -> None:
        known = set(self.deployer.names()) | {BASE}
        live = []
        for p in batch:
            if p.future.done():  # the client went away
                continue
            gone = sorted(set(p.names) - known)
            if gone:  # removed while the request waited
                p.future.set_exception(UnknownAdapterError(f"no adapter named {gone[0]!r}"))
            else:
                live.append(p)
        if not live:
            return
        texts = [t for p in live for t in p.texts]
        names = [n for p in live for n in p.names]
        t0 = time.perf_counter()
        frame = await asyncio.get_running_loop().run_in_executor(self._pool, self._forward, texts, names)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_texts.observe(len(texts))
        self.metrics.batch_requests.observe(len(live))
        start = 0
        for p in live:
            rows = frame.iloc[start:start + len(p.texts)]
            start += len(p.texts)
            if not p.future.done():
                p.future.set_result(rows)

    def _forward(self, texts, names):
        dep = self.deployer
        if not texts:
            return dep.predict([], adapters=[])
        try:
            return dep.predict(texts, adapters=names, batch_size=len(texts))
        except MixedBatchError:  # merged: one forward per adapter, rows put back in order
            parts = {}
            for n in dict.fromkeys(names):
                idx = [i for i, m in enumerate(names) if m == n]
                parts[n] = (idx, dep.predict([texts[i] for i in idx], adapter=n, batch_size=len(idx)))
            frame = pd.concat([f for _, f in parts.values()], ignore_index=True)
            order = np.argsort([i for idx, _ in parts.values() for i in idx], kind="stable")
            return frame.iloc[order].reset_index(drop=True)
