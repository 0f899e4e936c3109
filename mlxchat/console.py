"""
The library's log records on a terminal.

Library code (mlxchat.*) does not print: what it has to say goes to module loggers
(logging.getLogger(__name__), children of the "mlxchat" logger), which stay silent below WARNING
until someone asks for them. That keeps a training run driven from a dashboard, a notebook or a
test quiet. A command-line script calls log_to_console() at the start of main(); the records then
come out as plain lines on stdout, like the print() calls they replaced: INFO and up, below
WARNING on rank 0 only (as print0 did).
"""
import logging
import sys

from mlxchat.distributed import get_rank


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record arrives (a redirected stdout, pytest's capture),
    not to the stream that was sys.stdout when the handler was made."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass  # always sys.stdout


class _RankZeroBelowWarning(logging.Filter):
    def filter(self, record):
        return record.levelno >= logging.WARNING or get_rank() == 0


def log_to_console(level=logging.INFO):
    """Show the "mlxchat" logger's records of `level` and up as plain lines ("%(message)s") on stdout.
    Adds no handler when the "mlxchat" logger has one already (a second call, or a caller that set up
    its own), so no line shows twice. Records still propagate to the root logger (pytest's caplog
    sees them). Returns the "mlxchat" logger."""
    logger = logging.getLogger("mlxchat")
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RankZeroBelowWarning())
        logger.addHandler(handler)
    return logger
