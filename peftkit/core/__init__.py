"""Core: method specs and the one registry (`methods.METHODS`), finding target layers by name
(`targets`), and surgery on a model (`surgery`: apply, report, merge, unmerge, unload).

May import: layers.
"""
