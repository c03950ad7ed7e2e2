"""Notebook: what the notebooks show and how they run. plotly figures (`plots`, `diagrams`; the LoRA
variants' in `plots_variants`, federated runs' in `plots_federated`, notebook 10's merge heat map,
learning-forgetting curves and spectra in `multi_domain`, which also words its results), ipywidgets
UIs whose logic runs without a browser (`widgets`), the `make dashboard` app built from them (`app`),
the parameters-cell helpers and the quick recipe (`params`, with `record` for key results), the words
a notebook prints about its results, computed from intervals (`prose`), and the batch runner that
executes every notebook with papermill (`batch_run`).

May import: studies and everything below.
"""
