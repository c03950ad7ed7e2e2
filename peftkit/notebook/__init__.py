"""Notebook: what the notebooks show and how they run. plotly figures (`plots`, `diagrams`; federated
runs in `plots_federated`), ipywidgets UIs whose logic runs without a browser (`widgets`), the
`make dashboard` app built from them (`app`), the parameters-cell helpers (`params`) and the batch
runner that executes every notebook with papermill (`batch_run`).

May import: studies and everything below.
"""
