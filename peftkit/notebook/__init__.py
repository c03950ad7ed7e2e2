"""Notebook: what the notebooks show and how they run. plotly figures (`plots`), ipywidgets UIs
whose logic runs without a browser (`widgets`), the parameters-cell helpers and the quick recipe (`params`, with `record` for key
results), the words a notebook prints about its results, computed from intervals (`prose`), and the
batch runner that executes every notebook with papermill (`batch_run`).

May import: studies and everything below.
"""
