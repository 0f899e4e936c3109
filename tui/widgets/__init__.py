"""Widgets the panes share."""
from tui.widgets.plot import LinePlot, rasterize, sparkline

__all__ = ["LinePlot", "rasterize", "sparkline"]
