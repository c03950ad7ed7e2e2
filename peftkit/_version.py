"""The package version, in one place below everything that records it (files, results, manifests)."""

__version__ = "0.1.0"
