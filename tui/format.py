"""
Small formatters the panes share: numbers as people read them on a dashboard, short and of a
steady width. Each takes None (a figure not known yet) and returns "—" for it, so a pane can
format whatever it has without checking first.
"""
import math

NONE = "—"
_UNITS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k"))


def _known(x):
    return x is not None and not (isinstance(x, float) and (math.isnan(x) or math.isinf(x)))


def number(x):
    """A value in at most ~5 characters, three significant digits: 3.21, 12.3, 950, 1.2k, 12.3k,
    123k, 4.5M, 0.0123; tiny values in exponent form (1.2e-05)."""
    if not _known(x):
        return NONE
    a = abs(x)
    for scale, unit in _UNITS:
        if a >= scale * 0.9995:  # 999.96 reads as 1.0k, not 1000
            v = x / scale
            return f"{v:.1f}{unit}" if abs(v) < 99.95 else f"{v:.0f}{unit}"
    if a == 0 or (float(x).is_integer() and a >= 1):
        return str(int(x))
    if a >= 99.95:
        return f"{x:.0f}"
    if a >= 9.995:
        return f"{x:.1f}"
    if a >= 0.9995:
        return f"{x:.2f}"
    if a >= 0.001:
        return f"{x:.3g}"
    return f"{x:.1e}"


def count(n, unit=""):
    """A count with a thousands suffix: count(1234567, "params") -> "1.2M params"."""
    text = number(n)
    return f"{text} {unit}" if unit and text != NONE else text


def duration(seconds):
    """Elapsed or remaining time: "42s", "3m12s", "1h02m", "2d03h"."""
    if not _known(seconds):
        return NONE
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def seconds(x):
    """A short time such as a step's: "215 ms", "1.23 s", "42.0 s", longer ones as duration()."""
    if not _known(x):
        return NONE
    if x < 0.9995:
        return f"{x * 1000:.0f} ms"
    if x < 60:
        return f"{x:.3g} s" if x < 9.995 else f"{x:.1f} s"
    return duration(x)


def gib(x, digits=None):
    """Memory in GiB: "0.41 GiB", "3.2 GiB", "123 GiB" (fewer decimals as the value grows)."""
    if not _known(x):
        return NONE
    if digits is None:
        digits = 2 if abs(x) < 10 else 1 if abs(x) < 100 else 0
    return f"{x:.{digits}f} GiB"


def age(then, now):
    """How long ago a unix time was, as of `now` (passed in, so that screens can be tested with a
    fixed clock): "just now", "42 s ago", "3 min ago", "2 h ago", "3 days ago"."""
    if not _known(then) or not _known(now):
        return NONE
    s = max(now - then, 0)
    if s < 5:
        return "just now"
    if s < 60:
        return f"{int(s)} s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    if s < 86400:
        return f"{int(s // 3600)} h ago"
    days = int(s // 86400)
    return "1 day ago" if days == 1 else f"{days} days ago"


def percent(fraction, digits=0):
    """A fraction as a percentage: percent(0.423) -> "42%", percent(0.0123, 1) -> "1.2%"."""
    if not _known(fraction):
        return NONE
    return f"{fraction * 100:.{digits}f}%"
