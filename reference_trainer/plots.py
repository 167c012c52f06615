"""Every plot of the reference trainer's reports and of the experiment, in one module.

The curve plots take per-method, per-seed series (``SeedSeries``: method -> seed -> step ->
value) and draw, for each method in its own colour, marker and line style:

- the mean over seeds: a thick line with markers, at the steps every seed logged;
- the spread over seeds: a band from the smallest to the largest seed (min-max; drawn when a
  method has two seeds or more; the legend says so);
- every seed: a thin, lighter line of the method's colour, labelled "METHOD, seed N".

Around them: a y-axis fitted to the data with a small margin (clamped near the natural bounds
of the quantity, e.g. 0-100 for a percentage), integer step ticks, and curves that stay visible
when they coincide (each method has its own marker shape and size, drawn largest first, and a
small horizontal offset, said in the legend). With more than two methods of several seeds each
method gets its own axes (one row per quantity, one y-axis per row) with the other methods'
means in grey, so that overlapping bands do not hide each other. The hop plot shows bars (mean
over seeds) with min-max whiskers and a dot per seed. The paired-difference plot shows each
method's difference to a baseline per category (overall, per hop count): the estimate, its
interval as a whisker, a dot per seed and the zero line (``paired_differences_figure``).

A plot function returns a ``matplotlib.figure.Figure`` (the object API, no pyplot: no global
state, no display), which tests inspect and ``save`` writes. A new plot over the same series
(e.g. paired differences against a baseline with their intervals) is one more function here that
takes a ``SeedSeries`` and returns a figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SeedSeries = Mapping[str, Mapping[int, Mapping[int, float]]]
"""method -> seed -> step -> value (e.g. held-out EM in percent)."""

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
MARKER_SIZES = (8.0, 6.5, 5.0, 4.0)
SEED_ALPHA = 0.6
BAND_ALPHA = 0.15
MAX_STEP_TICKS = 12
"""Up to this many logged steps, each gets a tick; beyond, integer ticks at round intervals."""
OFFSET_SHARE = 0.015
"""Horizontal offset of neighbouring methods, as a share of the step range."""


@dataclass(frozen=True)
class Style:
    """How one method is drawn."""

    color: str
    marker: str
    linestyle: str
    markersize: float
    zorder: float


def method_styles(methods: Sequence[str]) -> dict[str, Style]:
    """A distinct colour, marker, line style and marker size per method, in order (largest markers first)."""
    return {method: Style(f"C{index % 10}", MARKERS[index % len(MARKERS)], LINESTYLES[index % len(LINESTYLES)],
                          MARKER_SIZES[min(index, len(MARKER_SIZES) - 1)], 3 + index)
            for index, method in enumerate(methods)}


@dataclass(frozen=True)
class Panel:
    """One axes of a curve figure.

    Attributes:
        series: method -> seed -> step -> value.
        title, ylabel: the axes' texts.
        reference: an optional (label, value) drawn as a dashed horizontal line (e.g. the warm start).
        bounds: the quantity's natural range (the fitted y-axis does not go far past it), or None.
        empty: the text shown when no method has a value.
    """

    series: SeedSeries
    title: str
    ylabel: str
    reference: tuple[str, float] | None = None
    bounds: tuple[float, float] | None = (0.0, 100.0)
    empty: str = "nothing logged"


def mean_band(seed_curves: Mapping[int, Mapping[int, float]]) -> list[tuple[int, float, float, float]]:
    """``(step, mean, min, max)`` over seeds at every step that every seed logged.

    Example:
        >>> mean_band({0: {0: 20.0, 5: 40.0}, 1: {0: 40.0, 5: 80.0, 7: 100.0}})
        [(0, 30.0, 20.0, 40.0), (5, 60.0, 40.0, 80.0)]
    """
    if not seed_curves:
        return []
    steps = sorted(set.intersection(*(set(curve) for curve in seed_curves.values())))
    points = []
    for step in steps:
        values = [curve[step] for curve in seed_curves.values()]
        points.append((step, sum(values) / len(values), min(values), max(values)))
    return points


def fitted_limits(values: Sequence[float], *, bounds: tuple[float, float] | None = None, margin: float = 0.08,
                  min_span: float = 4.0) -> tuple[float, float]:
    """Axis limits around ``values``: their range plus ``margin`` of it on each side, at least
    ``min_span`` wide (centred), kept within ``bounds`` widened by the margin.

    Example:
        >>> fitted_limits([5.0, 27.0], bounds=(0.0, 100.0))
        (3.24, 28.76)
        >>> fitted_limits([0.0, 0.0], bounds=(0.0, 100.0))
        (-0.32, 4.32)
    """
    values = [value for value in values if math.isfinite(value)]
    if not values:
        return (bounds or (0.0, 1.0))[0], (bounds or (0.0, 1.0))[1]
    low, high = min(values), max(values)
    if high - low < min_span:
        extra = (min_span - (high - low)) / 2
        low, high = low - extra, high + extra
    pad = margin * (high - low)
    low, high = low - pad, high + pad
    if bounds is not None:
        floor, ceiling = bounds[0] - pad, bounds[1] + pad
        if low < floor:
            low, high = floor, min(high + floor - low, ceiling)
        if high > ceiling:
            low, high = max(low - (high - ceiling), floor), ceiling
    return round(low, 6), round(high, 6)


def _offsets(methods: Sequence[str], steps: Sequence[int]) -> dict[str, float]:
    """Each method's horizontal offset (0 for one method): neighbours ``OFFSET_SHARE`` of the step range apart."""
    span = (max(steps) - min(steps)) if steps else 0
    step = OFFSET_SHARE * max(span, 1)
    return {method: (index - (len(methods) - 1) / 2) * step for index, method in enumerate(methods)}


def _draw_method(ax: Any, label: str, seeds: Mapping[int, Mapping[int, float]], style: Style, offset: float) -> list[float]:
    """One method's per-seed lines, band and mean line; returns every value drawn."""
    drawn = []
    for seed, curve in sorted(seeds.items()):
        steps = sorted(curve)
        values = [curve[step] for step in steps]
        drawn += values
        if len(seeds) > 1:
            ax.plot([step + offset for step in steps], values, color=style.color, linestyle=style.linestyle,
                    linewidth=1.0, alpha=SEED_ALPHA, zorder=1, label=f"{label}, seed {seed}", gid=f"seed:{label}:{seed}")
    points = mean_band(seeds)
    if not points:
        return drawn
    steps = [step + offset for step, *_ in points]
    if len(seeds) > 1:
        ax.fill_between(steps, [p[2] for p in points], [p[3] for p in points], color=style.color, alpha=BAND_ALPHA,
                        linewidth=0, zorder=0.5, label=f"{label}: min-max of {len(seeds)} seeds", gid=f"band:{label}")
    name = f"{label}: mean of {len(seeds)} seeds" if len(seeds) > 1 else f"{label}, seed {next(iter(seeds))}"
    ax.plot(steps, [p[1] for p in points], color=style.color, linestyle=style.linestyle, linewidth=2.0, marker=style.marker,
            markersize=style.markersize, markeredgecolor="white", markeredgewidth=0.6, zorder=style.zorder, label=name,
            gid=f"mean:{label}")
    return drawn


def _finish_axes(ax: Any, panel: Panel, title: str, steps: Sequence[int], drawn: Sequence[float], *,
                 ylabel: str | None = None) -> None:
    """Title, labels, grid, integer step ticks, the x range of ``steps``; the y-axis fitted to ``drawn``."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RL step")
    ax.set_ylabel(panel.ylabel if ylabel is None else ylabel)
    ax.grid(alpha=0.3)
    if 0 < len(steps) <= MAX_STEP_TICKS:
        ax.set_xticks(list(steps))  # a tick at every logged step (e.g. every evaluation)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    if not drawn:
        ax.text(0.5, 0.5, panel.empty, ha="center", va="center", transform=ax.transAxes)
        return
    ax.set_ylim(*fitted_limits(drawn, bounds=panel.bounds))
    if steps:
        pad = max(0.5, 0.03 * (steps[-1] - steps[0]))
        ax.set_xlim(steps[0] - pad, steps[-1] + pad)


def _draw_reference(ax: Any, panel: Panel) -> list[float]:
    if panel.reference is None:
        return []
    ax.axhline(panel.reference[1], color="black", linestyle=(0, (4, 3)), linewidth=1, zorder=0.2, label=panel.reference[0],
               gid="reference")
    return [panel.reference[1]]


def _draw_others(ax: Any, panel: Panel, method: str, methods: Sequence[str], labels: Mapping[str, str]) -> list[float]:
    """The other methods' means as thin grey lines (the comparison inside one method's facet)."""
    drawn = []
    for other in methods:
        points = mean_band(panel.series.get(other) or {})
        if other == method or not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], color="0.55", linewidth=0.9, linestyle=(0, (3, 2)), zorder=0.8,
                label="other methods' means", gid=f"other:{labels.get(other, other)}")
        drawn += [p[1] for p in points]
    return drawn


def _steps(panel: Panel) -> list[int]:
    return sorted({step for seeds in panel.series.values() for curve in seeds.values() for step in curve})


def _draw_combined(ax: Any, panel: Panel, styles: Mapping[str, Style], labels: Mapping[str, str]) -> None:
    """Every method of ``panel`` in one axes, neighbours slightly offset."""
    methods = [method for method in styles if panel.series.get(method)]
    steps = _steps(panel)
    offsets = _offsets(methods, steps)
    drawn = []
    for method in methods:
        drawn += _draw_method(ax, labels.get(method, method), panel.series[method], styles[method], offsets[method])
    drawn += _draw_reference(ax, panel)
    _finish_axes(ax, panel, panel.title, steps, drawn)


def _draw_facets(axes: Sequence[Any], panel: Panel, styles: Mapping[str, Style], labels: Mapping[str, str]) -> None:
    """One axes per method (its band, seeds and mean; the others' means in grey), one y-axis for
    the row; the method is each axes' title, the panel's title the row's y label."""
    methods, steps, drawn = list(styles), _steps(panel), []
    for ax, method in zip(axes, methods):
        label = labels.get(method, method)
        drawn += _draw_method(ax, label, panel.series.get(method) or {}, styles[method], 0.0)
        drawn += _draw_others(ax, panel, method, methods, labels) + _draw_reference(ax, panel)
    for column, (ax, method) in enumerate(zip(axes, methods)):
        _finish_axes(ax, panel, labels.get(method, method), steps, drawn,
                     ylabel=f"{panel.title}\n{panel.ylabel}" if column == 0 else "")
        if not panel.series.get(method):
            ax.text(0.5, 0.5, panel.empty, ha="center", va="center", transform=ax.transAxes)


def _legend(figure: Any, axes: Sequence[Any], several_seeds: bool, note: str) -> None:
    """One legend for the figure below the axes: each method's mean (and band), the reference
    line, one entry for the per-seed lines, and ``note`` (what the band and offsets are)."""
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if str(handle.get_gid()).startswith("seed:") or label in labels:
                continue
            handles.append(handle)
            labels.append(label)
    if several_seeds:
        handles.append(Line2D([], [], color="gray", linewidth=0.9, alpha=SEED_ALPHA + 0.2))
        labels.append("thin lines: single seeds, in their method's colour")
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8,
                      title=note, title_fontsize=8, frameon=False)


def seed_curves_figure(panels: Sequence[Panel], *, methods: Sequence[str] | None = None,
                       labels: Mapping[str, str] | None = None, facets: bool | None = None) -> Any:
    """Per-method curves over RL steps (module docstring): the panels side by side, or with
    ``facets`` a row of axes per panel.

    Args:
        panels: what each row shows.
        methods: the methods in drawing order (default: as they first appear in the panels).
        labels: display names of the methods.
        facets: one axes per method in each row (its band, seeds and mean, the other methods'
            means in grey), so that the bands of many methods do not hide each other; default:
            when more than two methods have several seeds. Otherwise every method shares one axes
            per panel, neighbours offset slightly.
    """
    labels = dict(labels or {})
    if methods is None:
        methods = list(dict.fromkeys(method for panel in panels for method in panel.series))
    styles = method_styles(methods)
    several = any(len(seeds) > 1 for panel in panels for seeds in panel.series.values())
    facets = several and len(methods) > 2 if facets is None else facets
    if facets:  # a row per panel, a column per method
        figure = new_figure(3.4 * len(methods), 3.2 * len(panels) + 1.2)
        grid = figure.subplots(len(panels), len(methods), squeeze=False)
        for row, panel in zip(grid, panels):
            _draw_facets(row, panel, styles, labels)
    else:  # the panels side by side
        figure = new_figure(8.0 if len(panels) == 1 else 5.5 * len(panels), 4.6)
        grid = figure.subplots(1, len(panels), squeeze=False)
        for ax, panel in zip(grid[0], panels):
            _draw_combined(ax, panel, styles, labels)
    spread = "band: min-max over seeds" if several else "one run per method"
    offsets = "" if facets else (f"; methods offset by up to {100 * OFFSET_SHARE * max(len(methods) - 1, 0) / 2:.1f}% "
                                 "of the step range so that equal values stay visible")
    _legend(figure, list(grid.ravel()), several, spread + offsets)
    return figure


def hop_bars_figure(scores: Mapping[str, Mapping[str, Mapping[int, float]]], *, methods: Sequence[str],
                    labels: Mapping[str, str] | None = None, ylabel: str = "final held-out EM (%)",
                    title: str = "final held-out EM by hop count") -> Any:
    """Bars per hop count and method: the mean over seeds, whiskers from the lowest to the highest
    seed, and a dot per seed (method -> hop -> seed -> value)."""
    labels = dict(labels or {})
    styles = method_styles(methods)
    hops = sorted({hop for table in scores.values() for hop in table}, key=lambda hop: (not str(hop).isdigit(), int(hop) if str(hop).isdigit() else 0))
    figure = new_figure(8, 4.6)
    ax = figure.subplots()
    width = 0.8 / max(len(methods), 1)
    drawn = []
    for index, method in enumerate(methods):
        style, label = styles[method], labels.get(method, method)
        per_hop = [list((scores.get(method, {}).get(hop) or {}).values()) for hop in hops]
        positions = [h + (index - (len(methods) - 1) / 2) * width for h in range(len(hops))]
        means = [sum(v) / len(v) if v else math.nan for v in per_hop]
        errors = [[m - min(v) if v else 0 for m, v in zip(means, per_hop)], [max(v) - m if v else 0 for m, v in zip(means, per_hop)]]
        ax.bar(positions, means, width, yerr=errors, capsize=2, color=style.color, alpha=0.75, label=label, gid=f"bars:{label}",
               error_kw={"elinewidth": 1, "ecolor": "black"})
        for position, values in zip(positions, per_hop):
            jitter = [position + width * 0.25 * (k - (len(values) - 1) / 2) / max(len(values), 1) for k in range(len(values))]
            ax.plot(jitter, values, linestyle="none", marker=style.marker, markersize=3.5, color=style.color,
                    markeredgecolor="black", markeredgewidth=0.4, zorder=3, gid=f"seeds:{label}")
            drawn += values
    ax.set_xticks(range(len(hops)), [f"{hop}-hop" for hop in hops])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.set_ylim(*fitted_limits([0.0, *drawn], bounds=(0.0, 100.0)))
    if hops:
        figure.legend(loc="outside lower center", ncol=min(4, len(methods)), fontsize=8, frameon=False,
                      title="bars: mean over seeds; whiskers: lowest to highest seed; dots: single seeds", title_fontsize=8)
    return figure


@dataclass(frozen=True)
class PairedPanel:
    """One axes of the paired-difference figure.

    Attributes:
        cells: method -> category (e.g. "all", "1", "2") -> ``(estimate, low, high, per_seed)``,
            in the plot's units (e.g. EM points); ``reference_trainer.paired.PairedInterval`` fits.
        title: the axes' title.
        ylabel: the y-axis label.
    """

    cells: Mapping[str, Mapping[str, Sequence[Any]]]
    title: str
    ylabel: str = "difference (points)"


def _category_label(category: str) -> str:
    return "overall" if category == "all" else f"{category}-hop" if str(category).isdigit() else str(category)


def paired_differences_figure(panels: Sequence[PairedPanel], *, labels: Mapping[str, str] | None = None,
                              baseline: str = "GRPO") -> Any:
    """Each method's paired difference to ``baseline`` per category, one axes per panel: a marker at
    the estimate with the interval as a whisker, a small dot per seed (its own difference), and a
    dashed line at 0 (an interval that crosses it does not tell the method from the baseline)."""
    labels = dict(labels or {})
    figure = new_figure(max(6.0, 5.5 * len(panels)), 4.6)
    grid = figure.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(grid[0], panels):
        methods = list(panel.cells)
        styles = method_styles(methods)
        categories = list(dict.fromkeys(category for cells in panel.cells.values() for category in cells))
        width = 0.7 / max(len(methods), 1)
        drawn = [0.0]
        for index, method in enumerate(methods):
            style, label = styles[method], labels.get(method, method)
            offset = (index - (len(methods) - 1) / 2) * width
            present = [(position, panel.cells[method][category]) for position, category in enumerate(categories)
                       if category in panel.cells[method]]
            x = [position + offset for position, _ in present]
            estimates = [cell[0] for _, cell in present]
            errors = [[cell[0] - cell[1] for _, cell in present], [cell[2] - cell[0] for _, cell in present]]
            drawn_bars = ax.errorbar(x, estimates, yerr=errors, fmt=style.marker, color=style.color, markersize=style.markersize,
                                     capsize=3, linewidth=1.5, zorder=style.zorder, label=f"{label} - {baseline}")
            drawn_bars.lines[0].set_gid(f"paired:{label}")  # the markers at the estimates
            for position, cell in zip(x, (cell for _, cell in present)):
                seeds = list(cell[3])
                ax.plot([position + width * 0.3] * len(seeds), seeds, linestyle="none", marker=".", markersize=4,
                        color=style.color, alpha=SEED_ALPHA, zorder=1, gid=f"paired-seeds:{label}")
                drawn += [cell[1], cell[2], *seeds]
        ax.axhline(0.0, color="black", linestyle=(0, (4, 3)), linewidth=1, zorder=0.2, gid="zero")
        ax.set_xticks(range(len(categories)), [_category_label(category) for category in categories])
        ax.set_xlim(-0.6, len(categories) - 0.4)
        ax.set_ylim(*fitted_limits(drawn, bounds=None))
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3, axis="y")
    handles, names = grid[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, names, loc="outside lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False,
                      title="marker: mean paired difference; whisker: 95% bootstrap interval; dots: single seeds",
                      title_fontsize=8)
    return figure


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, no pyplot (nothing global changes, no display needed)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as a PNG of at most 256 colours (translucent bands otherwise make a plot
    several times larger for no visible difference), without the matplotlib version in its metadata."""
    import io

    from PIL import Image

    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, format="png", optimize=True)
    return path
