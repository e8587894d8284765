"""Reporting helpers for the accuracy-retention demo: a plot, a progress bar and a table.

* :func:`plot_accuracy_vs_macs` draws accuracy against the fraction of multiply-accumulates
  kept, one line per importance criterion, and writes the PNG atomically (render to memory,
  write a temp file beside the target, ``os.replace``), so a reader never sees half a file.
  It uses matplotlib's Agg canvas directly and never touches ``pyplot`` or the global backend.
* :class:`ProgressBar` is a dependency-free progress bar on stderr. It draws only on a TTY
  unless forced; forced onto a non-TTY (a log file, pytest's capture) it writes a whole line
  at each tenth of the way instead of carriage-return redraws.
* :func:`format_table` aligns rows into a plain-text table: numbers right, text left.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TextIO

__all__ = ["plot_accuracy_vs_macs", "ProgressBar", "format_table", "write_bytes_atomically"]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_bytes_atomically(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` atomically (``secateurs.runtime.io.atomic_write_bytes``:
    temp file in the same folder, fsync, ``os.replace``). Creates missing parent folders."""
    from secateurs.runtime.io import atomic_write_bytes

    return atomic_write_bytes(path, data)


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------

# Okabe-Ito's colour-blind-safe palette (yellow dropped: unreadable on white) and three more
# dark tones, each with its own marker and dash, so 11 lines stay apart in colour, shape and
# grey-scale print alike.
_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#882255",
           "#44AA99", "#999933", "#661100", "#6699CC")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*")
_DASHES = ("-", "--", "-.", ":")


def _style(index: int) -> dict[str, object]:
    return {"color": _COLORS[index % len(_COLORS)], "marker": _MARKERS[index % len(_MARKERS)],
            "linestyle": _DASHES[(index // len(_COLORS) + index) % len(_DASHES)],
            "markersize": 6, "linewidth": 1.6}


def _check_results(results: Mapping[str, Sequence[tuple[float, float]]]) -> None:
    if not results:
        raise ValueError("plot_accuracy_vs_macs needs at least one criterion in results")
    for name, points in results.items():
        if not points:
            raise ValueError(f"criterion {name!r} has no (macs_kept_fraction, accuracy) points")
        for point in points:
            if len(point) != 2 or not all(math.isfinite(float(v)) for v in point):
                raise ValueError(
                    f"criterion {name!r} has point {point!r}; expected two finite numbers "
                    "(macs_kept_fraction, accuracy)"
                )


def _accuracy_panel(axes: object, results: Mapping[str, Sequence[tuple[float, float]]],
                    baseline: float | None, highlight: str | None, ylabel: str) -> None:
    from matplotlib.ticker import PercentFormatter

    names = [n for n in results if n != highlight]
    for index, name in enumerate(names):
        points = sorted((float(x), float(y)) for x, y in results[name])
        axes.plot([x for x, _ in points], [y for _, y in points], label=name, **_style(index))
    if highlight is not None and highlight in results:
        points = sorted((float(x), float(y)) for x, y in results[highlight])
        axes.plot([x for x, _ in points], [y for _, y in points], label=highlight,
                  color="black", marker="*", markersize=13, linewidth=2.6, zorder=5)
    if baseline is not None:
        axes.axhline(baseline, color="0.35", linestyle=(0, (4, 3)), linewidth=1.2,
                     label=f"dense ({100 * baseline:.2f}%)", zorder=1)
    axes.set_xlabel("MACs kept (% of the dense model)")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    axes.grid(True, alpha=0.3)
    xs = [float(x) for pts in results.values() for x, _ in pts]
    axes.set_xlim(min(xs) - 0.05, max(xs) + 0.05)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                fontsize=9, frameon=False)


def _deployment_panels(axes_size: object, axes_latency: object,
                       rows: Sequence[Mapping[str, object]]) -> None:
    """Horizontal bars per deployed model: size and ORT latency, accuracy in the labels."""
    labels = [f"{r['name']}\n{100 * float(r['accuracy']):.2f}% acc." for r in rows][::-1]
    colors = ["#999999", "#0072B2", "#D55E00", "#009E73"][:len(rows)][::-1]
    panels = ((axes_size, "size on disk (KB)", [float(r["bytes"]) / 1e3 for r in rows],
               "smaller"),
              (axes_latency, "ONNX Runtime CPU latency (ms)",
               [float(r["latency_ms"]) for r in rows], "faster"))
    for ax, title, values, word in panels:
        bars = ax.barh(labels, values[::-1], color=colors, height=0.6)
        base = values[0]
        for bar, value in zip(bars, values[::-1]):
            ratio = base / value if value else 1.0
            note = f" {value:.3g}"
            if value != base:
                note += (f" ({ratio:.1f}x {word})" if ratio >= 1
                         else f" ({1 / ratio:.1f}x {'larger' if word == 'smaller' else 'slower'})")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center",
                    fontsize=9)
        ax.set_xlim(0, max(values) * 2.0)
        ax.set_xlabel(title)
        ax.grid(True, axis="x", alpha=0.3)
        ax.tick_params(axis="y", labelsize=9)
    axes_latency.tick_params(axis="y", labelleft=False)


def plot_accuracy_vs_macs(
    results: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike[str],
    *,
    title: str = "Accuracy retention under structured pruning",
    baseline: float | None = None,
    ylabel: str = "test accuracy",
    highlight: str | None = None,
    deployment: Sequence[Mapping[str, object]] | None = None,
    deployment_title: str = "Deployed in ONNX Runtime",
) -> Path:
    """Plot accuracy against MACs kept, one line per criterion, and write a PNG to ``path``.

    ``results`` maps a criterion name to ``(macs_kept_fraction, accuracy)`` points, where
    ``macs_kept_fraction`` is pruned MACs / dense MACs (1.0 = unpruned) and ``accuracy`` is in
    ``[0, 1]``; both axes are drawn in percent. Each line has its own colour, marker and dash;
    ``highlight`` (a key of ``results``) is drawn bold in black; the legend sits outside the
    axes so it never covers a curve. ``baseline`` (the dense model's accuracy) adds a dashed
    reference line. ``deployment``: rows ``{"name", "accuracy", "bytes", "latency_ms"}`` (first
    row = the reference) add two bar panels, size and latency. Returns the written path.
    """
    _check_results(results)
    if deployment is not None:
        missing = [k for k in ("name", "accuracy", "bytes", "latency_ms")
                   if any(k not in row for row in deployment)]
        if not deployment or missing:
            raise ValueError(f"deployment rows need name, accuracy, bytes and latency_ms; "
                             f"missing {missing or 'rows'}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    wide = deployment is not None
    figure = Figure(figsize=(13.0, 5.0) if wide else (8.8, 5.0), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    if wide:
        left, right = figure.subfigures(1, 2, width_ratios=[1.2, 1.0], wspace=0.0)
        axes = left.subplots()
        size_ax, latency_ax = right.subplots(1, 2, sharey=True)
        _deployment_panels(size_ax, latency_ax, deployment)
        right.suptitle(deployment_title, fontsize=12)
        left.suptitle(title, fontsize=12)
    else:
        axes = figure.add_subplot()
        figure.suptitle(title, fontsize=12)
    _accuracy_panel(axes, results, baseline, highlight, ylabel if "%" in ylabel
                    else f"{ylabel} (%)")

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_bytes_atomically(buffer.getvalue(), path)


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on stderr, usable as a context manager.

    ::

        with ProgressBar(total=steps, desc="fine-tune") as bar:
            for _ in range(steps):
                ...
                bar.update(postfix=f"loss {loss:.3f}")

    It draws when ``enabled`` and either the stream is a TTY or ``force`` is set. On a TTY it
    redraws in place (at most every ``min_interval_s`` seconds, plus the final state); forced
    onto a non-TTY it writes a full line at each tenth of ``total``, so logs stay readable.
    ``stream`` defaults to ``sys.stderr`` as it is when the bar is made.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool = True,
        force: bool = False,
        stream: TextIO | None = None,
        width: int = 30,
        min_interval_s: float = 0.1,
    ) -> None:
        if total < 0:
            raise ValueError(f"ProgressBar total={total} must be non-negative")
        self.total = total
        self.desc = desc
        self.stream: TextIO = sys.stderr if stream is None else stream
        self.width = width
        self.min_interval_s = min_interval_s
        self.count = 0
        self.postfix = ""
        self.tty = _isatty(self.stream)
        self.active = enabled and (force or self.tty)
        self._last_draw = -math.inf
        self._last_decile = -1
        self._closed = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def render(self) -> str:
        """The bar as text, e.g. ``train [#########.....] 12/20 loss 0.1``."""
        fraction = 1.0 if self.total == 0 else min(self.count / self.total, 1.0)
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        text = f"[{bar}] {self.count}/{self.total}"
        if self.desc:
            text = f"{self.desc} {text}"
        if self.postfix:
            text = f"{text} {self.postfix}"
        return text

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by ``n`` steps and optionally replace the text after the bar."""
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        if not self.active or self._closed:
            return
        done = self.total > 0 and self.count >= self.total
        if self.tty:
            now = time.monotonic()
            if done or now - self._last_draw >= self.min_interval_s:
                self._last_draw = now
                self.stream.write("\r" + self.render() + "\x1b[K")
                self.stream.flush()
            return
        decile = 10 if self.total == 0 else min(10 * self.count // self.total, 10)
        if decile > self._last_decile:
            self._last_decile = decile
            self.stream.write(self.render() + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Finish the line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.active and self.tty:
            self.stream.write("\r" + self.render() + "\x1b[K\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # closed or detached stream
        return False


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def _cell(value: object, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_table(
    rows: Sequence[Sequence[object]],
    headers: Sequence[str],
    *,
    floatfmt: str = ".4f",
    sep: str = "  ",
) -> str:
    """Format ``rows`` under ``headers`` as an aligned plain-text table.

    A column whose non-empty cells are all numbers is right-aligned, any other is
    left-aligned. Floats use ``floatfmt``; ``None`` prints as an empty cell. A dashed rule
    separates the header. Lines carry no trailing spaces and there is no trailing newline.
    """
    ncols = len(headers)
    if ncols == 0:
        raise ValueError("format_table needs at least one header")
    for index, row in enumerate(rows):
        if len(row) != ncols:
            raise ValueError(f"row {index} has {len(row)} cells but there are {ncols} headers")
    cells = [[_cell(v, floatfmt) for v in row] for row in rows]
    numeric = [
        all(_is_number(row[c]) for row in rows if row[c] is not None)
        and any(row[c] is not None for row in rows)
        for c in range(ncols)
    ]
    widths = [max([len(str(headers[c]))] + [len(row[c]) for row in cells]) for c in range(ncols)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[c]) if numeric[c] else v.ljust(widths[c]) for c, v in enumerate(values)
        ]
        return sep.join(parts).rstrip()

    out = [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)
