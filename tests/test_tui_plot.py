"""
The dashboard's terminal plots (tui.widgets.plot): the braille rasterizer as a pure function (where
dots land, lines between points, gaps, constant series, log-y, clipping, sizes), the min/max
bucketing that keeps spikes, the sparkline, and the LinePlot widget's labels and caching.
"""
import asyncio
import math

from textual.app import App

from tui.widgets.plot import BRAILLE, DOT_BITS, LinePlot, _Series, bucket, dot_grid, rasterize, sparkline


def lit(grid):
    """The dots set in a dot grid, as (dot column, dot row) with row 0 at the top."""
    dots = set()
    for r, row in enumerate(grid):
        for c, bits in enumerate(row):
            for dy in range(4):
                for dx in range(2):
                    if bits & DOT_BITS[dy][dx]:
                        dots.add((2 * c + dx, 4 * r + dy))
    return dots


def rows_by_column(dots):
    columns = {}
    for x, y in dots:
        columns.setdefault(x, []).append(y)
    return columns


def test_rising_line_rises_left_to_right_without_gaps():
    grid = dot_grid([(0, 0), (10, 10)], 10, 5, (0, 10), (0, 10))
    columns = rows_by_column(lit(grid))
    assert sorted(columns) == list(range(20))  # one line across every dot column: no gaps
    tops = [min(columns[x]) for x in range(20)]
    assert tops == sorted(tops, reverse=True)  # row 0 is the top: rising means the row index falls
    assert max(columns[0]) == 19 and min(columns[19]) == 0  # from the bottom-left corner to the top-right


def test_sparse_points_are_joined_by_a_line():
    # two evals 1000 steps apart still draw a continuous line, not two dots
    grid = dot_grid([(0, 1.0), (1000, 0.5)], 20, 4, (0, 1000), (0.5, 1.0))
    assert sorted(rows_by_column(lit(grid))) == list(range(40))


def test_single_point_lands_where_its_value_says():
    dots = lit(dot_grid([(5, 5)], 5, 3, (0, 10), (0, 10)))
    # x 5 of 0..10 over 10 dot columns -> 4.5 -> 5; y 5 over 12 dot rows (top = 10) -> 5.5 -> 6
    assert dots == {(5, 6)}
    # zero-span ranges (one point, auto ranges) put it in the middle
    lines = rasterize([[(3, 7)]], 11, 3)
    assert [i for i, line in enumerate(lines) if line.strip()] == [1]
    assert lines[1].index(lines[1].strip()) == 5


def test_constant_series_is_centred():
    dots = lit(dot_grid([(x, 4.2) for x in range(50)], 12, 5, (0, 49), (4.2, 4.2)))
    rows = {y for _, y in dots}
    assert len(rows) == 1  # flat
    assert rows.pop() // 4 == 2  # the middle of five cell rows
    assert len(dots) == 24  # and it spans the whole width


def test_nan_and_none_are_skipped_and_the_line_carries_over():
    ranges = dict(x_range=(0, 3), y_range=(0, 3))
    with_gaps = dot_grid([(0, 0), (1, float("nan")), (2, None), (3, 3)], 8, 4, **ranges)
    clean = dot_grid([(0, 0), (3, 3)], 8, 4, **ranges)
    assert with_gaps == clean
    assert rasterize([[(0, float("nan")), (1, None)]], 6, 2) == [" " * 6] * 2  # nothing to draw: blank, no error
    assert rasterize([[(0, math.inf), (1, 2.0), (2, 2.5)]], 6, 2)  # inf skipped too


def test_width_and_height_are_respected_whatever_the_data():
    wild = [(0, 1e9), (1, -1e9), (2, 0.5), (1e6, 0.7), (-1e6, 0.2)]
    for width, height in [(1, 1), (7, 3), (40, 10), (133, 17)]:
        lines = rasterize([wild, [(0, 0), (1, 1)]], width, height, x_range=(0, 2), y_range=(0, 1))
        assert len(lines) == height
        assert all(len(line) == width for line in lines)
        assert all(ch == " " or BRAILLE <= ord(ch) <= BRAILLE + 0xFF for line in lines for ch in line)


def test_points_outside_the_ranges_are_clipped_not_clamped():
    # a segment that leaves the y range is drawn up to the edge; a point far outside does not pile up on it
    dots = lit(dot_grid([(0, 0), (10, 100)], 10, 4, (0, 10), (0, 10)))
    assert max(x for x, _ in dots) <= 2  # the line exits the top near x = 1 of 10
    assert lit(dot_grid([(20, 5), (30, 5)], 10, 4, (0, 10), (0, 10))) == set()


def test_log_y_spaces_decades_evenly_and_skips_non_positive_values():
    def row_of(value, log_y):
        (dot,) = lit(dot_grid([(0, value)], 1, 4, (0, 0), (1, 1000), log_y=log_y))
        return dot[1]

    values = [1, 10, 100, 1000]
    assert [row_of(v, True) for v in values] == [15, 10, 5, 0]  # 16 dot rows, 3 decades: 5 rows apart
    assert [row_of(v, False) for v in values] == [15, 15, 14, 0]  # linear: the small ones crowd the bottom
    with_zero = lit(dot_grid([(0, 0), (1, -5), (2, 10), (3, 100)], 4, 4, (0, 3), (10, 100), log_y=True))
    assert with_zero == lit(dot_grid([(2, 10), (3, 100)], 4, 4, (0, 3), (10, 100), log_y=True))
    assert with_zero


def test_bucketing_keeps_a_spike_and_bounds_the_points():
    points = [(i, 1.0 + 0.001 * (i % 7)) for i in range(100_000)]
    points[61_234] = (61_234, 50.0)
    points[70_000] = (70_000, -3.0)
    kept = bucket(points, 80, (0, 99_999))
    assert len(kept) <= 160
    assert (61_234, 50.0) in kept and (70_000, -3.0) in kept
    assert [x for x, _ in kept] == sorted(x for x, _ in kept)
    # drawn: the spike reaches the top row, the dip the bottom row
    lines = rasterize([kept], 40, 6)
    assert lines[0].strip() and lines[-1].strip()


def test_growing_series_stays_bounded_keeps_spikes_and_reads_only_new_points():
    series = _Series(limit=200)
    history = []
    for i in range(50_000):
        history.append((i, 2.0 if i != 31_337 else 99.0))
        if i % 997 == 0:
            series.update(history)
    series.update(history)
    kept = series.points()
    assert len(kept) <= 200 + 2
    assert (31_337, 99.0) in kept
    assert kept[-1] == (49_999, 2.0)  # the newest point, so the x axis reaches the last step
    assert series.update(history) is False  # nothing new: nothing to redraw
    history[:] = [(0, 5.0)]  # the list was rewritten (a resumed run): start over
    assert series.update(history) is True and series.points() == [(0, 5.0)]


def test_sparkline():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, 5]) == "▄▄▄"
    assert sparkline([1, None, float("nan"), 2]) == "▁  █"
    assert sparkline(range(100), width=10) == sparkline(range(90, 100))  # the latest values
    assert sparkline([0, 25, 100], lo=0) == "▁▃█" and sparkline([75, 100]) == "▁█"  # lo=0: a gauge
    assert sparkline([], width=5) == "" and sparkline([1, 2], width=0) == ""


class PlotApp(App):
    def compose(self):
        yield LinePlot("loss", id="plot")


def test_line_plot_widget_labels_and_caching():
    asyncio.run(_line_plot_labels_and_caching())


async def _line_plot_labels_and_caching():
    app = PlotApp()
    async with app.run_test(size=(40, 10)) as pilot:
        plot = app.query_one(LinePlot)
        history = [(s, 10.0 - s / 20) for s in range(101)]
        plot.set_series("loss", history, "cyan")
        await pilot.pause()
        text = plot.render().plain.splitlines()
        assert len(text) == 10 and all(len(line) <= 40 for line in text)
        assert text[0].startswith("loss")
        assert text[1].lstrip().startswith("10┤") and text[-2].lstrip().startswith("5┤")  # y labels: max, min
        # and the middle row (row 4 of 8): the value at its centre, dot row 17.5 of 0..31 -> 10 - 17.5/31 * 5
        assert text[5].split("┤")[0].strip() == "7.18"
        assert text[-1].strip().startswith("└0") and text[-1].rstrip().endswith("100")  # x labels: first, last step
        assert any(BRAILLE < ord(ch) <= BRAILLE + 0xFF for line in text[1:-1] for ch in line)

        first = plot.render()
        plot.set_series("loss", history, "cyan")  # the same data again: no redraw
        assert plot.render() is first
        history.append((101, 4.9))
        plot.set_series("loss", history, "cyan")
        redrawn = plot.render()
        assert redrawn is not first and redrawn.plain.splitlines()[-1].rstrip().endswith("101")

        plot.log_y = True
        labels = plot.render().plain.splitlines()
        assert labels[1].lstrip().startswith("10┤") and labels[-2].lstrip().startswith("4.90┤")
        # the middle label is the geometric one: 10 ** (1 - 17.5/31 * (1 - log10 4.9)), not linear's 7.12
        assert labels[5].split("┤")[0].strip() == "6.69"
        plot.set_series("flat", [(0, 3.0), (101, 3.0)], "red")  # a second series gets a legend
        assert "━ flat" in plot.render().plain.splitlines()[0]


def test_line_plot_empty_and_tiny_sizes():
    asyncio.run(_line_plot_empty_and_tiny_sizes())


async def _line_plot_empty_and_tiny_sizes():
    app = PlotApp()
    async with app.run_test(size=(30, 6)) as pilot:
        plot = app.query_one(LinePlot)
        await pilot.pause()
        assert "no data yet" in plot.render().plain
        plot.set_series("a", [(0, 1), (1, 2)])
        plot.styles.min_height = 0
        for width, height in [(1, 1), (2, 2), (5, 3), (15, 4)]:
            plot.styles.width, plot.styles.height = width, height
            await pilot.pause()
            lines = plot.render().plain.splitlines()
            assert plot.size == (width, height)
            assert len(lines) <= height and all(len(line) <= width for line in lines)
            assert any(BRAILLE < ord(ch) <= BRAILLE + 0xFF for line in lines for ch in line)  # still a plot
