"""
Terminal plots: a braille line chart and a block sparkline.

A braille character (U+2800..U+28FF) is a 2 x 4 grid of dots, so a plot of W x H cells has
2W x 4H dots: four times the vertical resolution of block characters, enough to see a loss curve
bend in 10 rows. The drawing is a pure function (rasterize, dot_grid), tested on its own; LinePlot
wraps it in a Textual widget that keeps any number of points to a bounded few (min and max per
bucket, so a spike is never averaged away) and redraws only when its data or its size changed.
"""
import math
from typing import Optional

from rich.text import Text
from textual.widget import Widget

from tui.format import number

BRAILLE = 0x2800
# the bit of each dot in a braille cell, by [row][column] within the cell (Unicode's dots 1-8)
DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
SPARK_BARS = "▁▂▃▄▅▆▇█"


def _finite(x, y):
    return x is not None and y is not None and math.isfinite(x) and math.isfinite(y)


def _clean(points, log_y):
    """(x, y) pairs with None/NaN/inf dropped; with log_y, y becomes log10(y) and y <= 0 is dropped."""
    out = []
    for x, y in points:
        if not _finite(x, y):
            continue
        if log_y:
            if y <= 0:
                continue
            y = math.log10(y)
        out.append((x, y))
    return out


def data_range(series, log_y=False):
    """(x_range, y_range) covering every finite point of every series, in data units (not log), or
    (None, None) when there is none."""
    xs, ys = [], []
    for points in series:
        for x, y in _clean(points, log_y):
            xs.append(x)
            ys.append(y)
    if not xs:
        return None, None
    y_lo, y_hi = min(ys), max(ys)
    if log_y:
        y_lo, y_hi = 10 ** y_lo, 10 ** y_hi
    return (min(xs), max(xs)), (y_lo, y_hi)


def bucket(points, columns, x_range):
    """At most two points per column of `columns` equal slices of x_range: the lowest and the highest
    of each (in x order), so that lines drawn through them cover the same vertical extent as the
    original points. Non-finite points are dropped."""
    return _bucket([p for p in points if _finite(*p)], columns, x_range)


def _bucket(points, columns, x_range):
    # bucket() for points known to be finite: the widget's, on every redraw
    lo, hi = x_range
    scale = columns / (hi - lo) if hi > lo else 0.0
    last_column = columns - 1
    out = []
    current, low, high = None, None, None
    for point in points:
        column = int((point[0] - lo) * scale)
        if column > last_column:
            column = last_column
        if column != current:
            if low is not None:
                out.extend((low,) if low is high else sorted((low, high)))
            current, low, high = column, point, point
        elif point[1] < low[1]:
            low = point
        elif point[1] > high[1]:
            high = point
    if low is not None:
        out.extend((low,) if low is high else sorted((low, high)))
    return out


def _clip(x0, y0, x1, y1, w, h):
    """The part of the segment inside [-0.5, w - 0.5] x [-0.5, h - 0.5] (Liang-Barsky), or None: far
    outside points (a zoomed view, a value off the y range) must not cost a loop over every dot."""
    t0, t1 = 0.0, 1.0
    dx, dy = x1 - x0, y1 - y0
    for p, q in ((-dx, x0 + 0.5), (dx, w - 0.5 - x0), (-dy, y0 + 0.5), (dy, h - 0.5 - y0)):
        if p == 0:
            if q < 0:
                return None
        else:
            t = q / p
            if p < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
    if t0 > t1:
        return None
    return x0 + t0 * dx, y0 + t0 * dy, x0 + t1 * dx, y0 + t1 * dy


def dot_grid(points, width, height, x_range, y_range, log_y=False):
    """One series as braille dot bits: `height` rows of `width` ints (0 = no dot in that cell). Points
    map linearly into the ranges (x_range / y_range in data units; log_y plots log10(y)); consecutive
    finite points are joined by a line, so a series sampled every 100 steps is still a line. A range
    of zero span puts its points in the middle (a constant series is drawn centred)."""
    grid = [[0] * width for _ in range(height)]
    if width <= 0 or height <= 0:
        return grid
    w, h = 2 * width, 4 * height  # dots
    x_lo, x_hi = x_range
    y_lo, y_hi = y_range
    if log_y:
        if y_lo <= 0 or y_hi <= 0:
            return grid
        y_lo, y_hi = math.log10(y_lo), math.log10(y_hi)

    def to_dots(x, y):
        dx = (x - x_lo) / (x_hi - x_lo) * (w - 1) if x_hi != x_lo else (w - 1) / 2
        dy = (y_hi - y) / (y_hi - y_lo) * (h - 1) if y_hi != y_lo else (h - 1) / 2
        return dx, dy

    def plot(dx, dy):
        cx, cy = math.floor(dx + 0.5), math.floor(dy + 0.5)
        if 0 <= cx < w and 0 <= cy < h:
            grid[cy >> 2][cx >> 1] |= DOT_BITS[cy & 3][cx & 1]

    previous = None
    for x, y in _clean(points, log_y):
        here = to_dots(x, y)
        if previous is None:
            plot(*here)
        else:
            clipped = _clip(*previous, *here, w, h)
            if clipped:
                ax, ay, bx, by = clipped
                n = max(1, math.ceil(max(abs(bx - ax), abs(by - ay))))
                for i in range(n + 1):
                    plot(ax + (bx - ax) * i / n, ay + (by - ay) * i / n)
        previous = here
    return grid


def rasterize(series, width, height, x_range=None, y_range=None, log_y=False):
    """Several series drawn into one braille chart of `height` lines of `width` characters (a space
    where no dot falls). Ranges default to the data's."""
    auto_x, auto_y = data_range(series, log_y)
    x_range, y_range = x_range or auto_x, y_range or auto_y
    if x_range is None or y_range is None:
        return [" " * width for _ in range(height)]
    bits = [[0] * width for _ in range(height)]
    for points in series:
        for row, grid_row in zip(bits, dot_grid(points, width, height, x_range, y_range, log_y)):
            for i, b in enumerate(grid_row):
                row[i] |= b
    return ["".join(chr(BRAILLE + b) if b else " " for b in row) for row in bits]


def sparkline(values, width=None, lo=None, hi=None):
    """The last `width` values as block characters ▁..█ scaled between lo and hi (default: their own
    min and max); None or NaN shows as a space, a constant history as a flat middle bar."""
    if width is not None and width <= 0:
        return ""
    values = list(values)[-width:] if width else list(values)
    known = [v for v in values if _finite(0, v)]
    if not known:
        return " " * len(values)
    lo = min(known) if lo is None else lo
    hi = max(known) if hi is None else hi
    top = len(SPARK_BARS) - 1
    out = []
    for v in values:
        if not _finite(0, v):
            out.append(" ")
        elif hi <= lo:
            out.append(SPARK_BARS[top // 2])
        else:
            out.append(SPARK_BARS[max(0, min(top, round((v - lo) / (hi - lo) * top)))])
    return "".join(out)


# -----------------------------------------------------------------------------
# the widget

class _Series:
    """A growing series kept to at most `limit` points. Consecutive points are grouped in buckets of
    `size` points, and each full bucket keeps only its lowest and highest point; when the buckets
    fill the limit, neighbours merge and the bucket size doubles. Appending a step costs O(1), a run of
    a million steps still plots from `limit` points, and no spike is lost."""

    def __init__(self, limit):
        self.limit = limit
        self.source, self.consumed, self.first, self.last = None, 0, None, None
        self.buckets, self.pending, self.size = [], [], 1

    def points(self):
        tail = self._reduce(self.pending) if self.pending else []
        if self.pending and self.pending[-1] not in tail:
            tail.append(self.pending[-1])  # the newest point, so that the x axis reaches the last step
        return [p for b in self.buckets for p in b] + tail

    def update(self, points):
        """Follow `points` (a list that the caller appends to). Returns True if anything changed."""
        n = len(points)
        grown = (points is self.source and n >= self.consumed and
                 (self.consumed == 0 or (points[0] == self.first and points[self.consumed - 1] == self.last)))
        if grown and n == self.consumed:
            return False
        if not grown:  # another list, or this one was cut or rewritten: start over
            self.source, self.consumed, self.buckets, self.pending, self.size = points, 0, [], [], 1
        for x, y in points[self.consumed:n]:
            if not _finite(x, y):
                continue
            self.pending.append((x, y))
            if len(self.pending) >= self.size:
                self.buckets.append(self._reduce(self.pending))
                self.pending = []
                if 2 * len(self.buckets) > self.limit:
                    pairs = zip(self.buckets[::2], self.buckets[1::2] + [[]])
                    self.buckets = [self._reduce(a + b) for a, b in pairs]
                    self.size *= 2
        self.consumed = n
        self.first = points[0] if n else None
        self.last = points[n - 1] if n else None
        return True

    @staticmethod
    def _reduce(points):
        low = min(points, key=lambda p: p[1])
        high = max(points, key=lambda p: p[1])
        return [low] if low is high else sorted((low, high))


class LinePlot(Widget):
    """A braille line chart of one or more named series, with a title line, y-axis labels (max, mid,
    min) and x-axis labels (first and last x). It draws at whatever size the layout gives it; the
    drawing is cached until a series, the ranges or the size change."""

    DEFAULT_CSS = """
    LinePlot {
        height: 1fr;
        min-height: 3;
    }
    """
    MAX_POINTS = 2000

    def __init__(self, title="", *, log_y=False, empty_text="no data yet", name=None, id=None, classes=None):
        super().__init__(name=name, id=id, classes=classes)
        self._title = title
        self._log_y = log_y
        self.empty_text = empty_text
        self._series = {}  # name -> (_Series, style), drawn in insertion order (later ones on top)
        self._x_range = None
        self._version = 0
        self._cache_key, self._cache = None, None

    # -- what to draw

    def _changed(self):
        self._version += 1
        self.refresh()

    @property
    def title(self):
        return self._title

    @title.setter
    def title(self, value):
        if value != self._title:
            self._title = value
            self._changed()

    @property
    def log_y(self):
        return self._log_y

    @log_y.setter
    def log_y(self, value):
        if bool(value) != self._log_y:
            self._log_y = bool(value)
            self._changed()

    def set_x_range(self, x_range: Optional[tuple]):
        """Fix the x axis (e.g. to line up with another plot); None follows the data."""
        if x_range != self._x_range:
            self._x_range = x_range
            self._changed()

    def set_series(self, name, points, style=""):
        """Show `points` [(x, y), ...] as the series `name`. Cheap to call with the same, growing list
        on every update: only the new points are read."""
        entry = self._series.get(name)
        if entry is None:
            entry = self._series[name] = [_Series(self.MAX_POINTS), style]
        changed = entry[0].update(points)
        if style != entry[1]:
            entry[1], changed = style, True
        if changed:
            self._changed()

    def remove_series(self, name):
        if self._series.pop(name, None) is not None:
            self._changed()

    def clear(self):
        if self._series:
            self._series.clear()
            self._changed()

    def series_points(self, name):
        """The points kept for `name` (at most MAX_POINTS)."""
        return self._series[name][0].points()

    # -- drawing

    def render(self):
        key = (self.size, self._version)
        if key != self._cache_key:
            self._cache_key, self._cache = key, self._draw(self.size.width, self.size.height)
        return self._cache

    def _draw(self, width, height):
        if width <= 0 or height <= 0:
            return Text()
        series = [(name, s.points(), style) for name, (s, style) in self._series.items()]
        if self._log_y:  # non-positive values have no place on a log axis: not even as a bucket's low
            series = [(name, [p for p in points if p[1] > 0], style) for name, points, style in series]
        x_range, y_range = self._extent([points for _, points, _ in series])
        x_range = self._x_range or x_range
        if y_range is not None and y_range[0] == y_range[1]:
            y_range = self._widen(y_range[0])
        lines = []
        has_title = height >= 3
        has_x_axis = height >= 4
        rows = height - has_title - has_x_axis
        if has_title:
            lines.append(self._title_line(series, width))
        if x_range is None or y_range is None:
            blank = [Text(" " * width) for _ in range(rows)]
            message = Text(self.empty_text[:width], style="dim")
            blank[rows // 2] = Text(" " * ((width - len(message)) // 2)) + message
            lines.extend(blank)
            if has_x_axis:
                lines.append(Text())
            return Text("\n").join(lines)

        labels = self._y_labels(y_range, rows) if width >= 16 else {}
        label_width = max((len(t) for t in labels.values()), default=0)
        axis = 1 if labels else 0
        cells = max(1, width - label_width - axis)
        grids = [(dot_grid(_bucket(points, 2 * cells, x_range), cells, rows, x_range, y_range, self._log_y), style)
                 for _, points, style in series]
        for r in range(rows):
            line = Text(no_wrap=True, overflow="crop")
            if labels:
                line.append(labels.get(r, "").rjust(label_width), style="dim")
                line.append("┤" if r in labels else "│", style="dim")
            self._append_row(line, [(grid[r], style) for grid, style in grids], cells)
            lines.append(line)
        if has_x_axis:
            first, last = self._x_label(x_range[0]), self._x_label(x_range[1])
            room = cells - len(first) - len(last)
            x_axis = " " * label_width + ("└" if axis else "")
            x_axis += first + " " * room + last if room >= 1 else first
            lines.append(Text(x_axis[:width], style="dim"))
        return Text("\n").join(lines)

    @staticmethod
    def _extent(lists):
        # data_range() for the kept points, which are finite: min and max run in C
        xs = [p[0] for points in lists for p in points]
        if not xs:
            return None, None
        ys = [p[1] for points in lists for p in points]
        return (min(xs), max(xs)), (min(ys), max(ys))

    @staticmethod
    def _x_label(x):
        # steps are read exactly ("12,345"), other x values compactly
        return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e7 else number(x)

    def _widen(self, v):
        # a constant series: a range around it puts the line in the middle with honest labels
        if self._log_y:
            return v / 2, v * 2
        pad = abs(v) * 0.1 or 1.0
        return v - pad, v + pad

    def _title_line(self, series, width):
        title = self._title if isinstance(self._title, Text) else Text(str(self._title), style="bold")
        legend = Text()
        if len(series) > 1:
            for name, _, style in series:
                legend.append("  ━ ", style=style)
                legend.append(name, style="dim")
        line = title.copy()
        if len(title) + len(legend) + 1 <= width:
            line.append(" " * (width - len(title) - len(legend)))
            line.append_text(legend)
        line.truncate(width, overflow="ellipsis")
        return line

    def _y_labels(self, y_range, rows):
        """Labels for the top, middle and bottom rows: the value at each row's centre line."""
        lo, hi = y_range
        if self._log_y:
            lo, hi = math.log10(lo), math.log10(hi)
        dots = 4 * rows

        def value_at(row):  # the top row shows the maximum, the bottom row the minimum
            centre = 0 if row == 0 else dots - 1 if row == rows - 1 else 4 * row + 1.5
            v = hi - centre / max(dots - 1, 1) * (hi - lo)
            return 10 ** v if self._log_y else v

        picks = [0, rows - 1] + ([rows // 2] if rows >= 5 else [])
        return {row: number(value_at(row)) for row in picks}

    @staticmethod
    def _append_row(line, layers, cells):
        """One row of cells: the dots of every series together, coloured by the topmost series with a
        dot in the cell; runs of one style are appended as one span."""
        run, run_style = [], None
        for i in range(cells):
            bits, style = 0, ""
            for row, s in layers:
                if row[i]:
                    bits |= row[i]
                    style = s
            char = chr(BRAILLE + bits) if bits else " "
            if style != run_style and run:
                line.append("".join(run), style=run_style or None)
                run = []
            run_style = style
            run.append(char)
        if run:
            line.append("".join(run), style=run_style or None)
