"""Serving: the `Deployer` (many adapters on one base, hot-swapped, or mixed in one batch: mixed.py;
registry.py the checks on registering an adapter and the entries it holds; requests.py what
predict takes and returns), its store on disk, the `Monitor` with its drift statistics, the
monitor's dashboard figure, and the HTTP service (FastAPI, uvicorn, prometheus-client): http.py
the app, api_schema.py its wire format and settings, batcher.py dynamic batching and the
metrics, server.py running it.

May import: core, files, bases, data, layers, runtime, storage, style. Never training or studies.
"""
