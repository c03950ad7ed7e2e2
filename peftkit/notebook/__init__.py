"""Notebook: what the notebooks show and how they run. plotly figures (`plots`), ipywidgets UIs
whose logic runs without a browser (`widgets`), the parameters-cell helpers (`params`) and the
batch runner that executes every notebook with papermill (`batch_run`); `multi_domain` draws
notebook 10's merge heat map, learning-forgetting curves and spectra, and words its results.

May import: studies and everything below.
"""
