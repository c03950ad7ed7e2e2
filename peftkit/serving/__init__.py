"""Serving: the `Deployer` (many adapters on one base, hot-swapped), its store on disk, the
`Monitor` with its drift statistics, and the monitor's dashboard figure.

May import: core, files, bases, data, layers, runtime, storage, style. Never training or studies.
"""
