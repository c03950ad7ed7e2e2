"""Core: method specs and the one registry (`methods.METHODS`), which layer kinds each method
wraps (`kinds`), finding target layers by name (`targets`), and surgery on a model (`surgery`:
apply, report, merge, unmerge, unload).

May import: layers.
"""
