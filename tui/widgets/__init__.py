"""Widgets the panes share."""
from tui.widgets.footer import KeyFooter
from tui.widgets.plot import LinePlot, rasterize, sparkline

__all__ = ["KeyFooter", "LinePlot", "rasterize", "sparkline"]
