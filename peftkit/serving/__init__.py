"""Serving: the `Deployer` (many adapters on one base, hot-swapped, or mixed in one batch: mixed.py),
its store on disk, the `Monitor` with its drift statistics, the monitor's dashboard figure, and
the HTTP service (http.py: FastAPI, uvicorn, prometheus-client).

May import: core, files, bases, data, layers, runtime, storage, style. Never training or studies.
"""
