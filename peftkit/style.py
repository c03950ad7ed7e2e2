"""The project's look: one plotly template, and one colour per method for every figure.

The colours are the registry's (`Method.color` in core/methods.py), so a method drawn by notebook
04, the selection widgets or the batch report has the same colour everywhere.
"""

from __future__ import annotations

from .core.methods import METHODS

TEMPLATE = "plotly_white"


def method_colors() -> dict[str, str]:
    """Method name -> colour, for every registered method (plotly's color_discrete_map)."""
    return {name: cls.color for name, cls in METHODS.items()}
