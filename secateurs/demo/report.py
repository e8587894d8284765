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
import tempfile
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
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    Creates missing parent folders. The file gets the usual ``0666 & ~umask`` mode.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def plot_accuracy_vs_macs(
    results: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike[str],
    *,
    title: str = "Accuracy retention under structured pruning",
    baseline: float | None = None,
    ylabel: str = "test accuracy",
) -> Path:
    """Plot accuracy against MACs kept, one line per criterion, and write a PNG to ``path``.

    ``results`` maps a criterion name to ``(macs_kept_fraction, accuracy)`` points, where
    ``macs_kept_fraction`` is pruned MACs / dense MACs (1.0 = unpruned) and ``accuracy`` is in
    ``[0, 1]``. Points are drawn in order of ``macs_kept_fraction``; the x axis runs from
    dense on the right to most pruned on the left. ``baseline`` (the dense model's accuracy)
    adds a dashed reference line. Returns the written path.
    """
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

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in sorted(results):
        points = sorted((float(x), float(y)) for x, y in results[name])
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    if baseline is not None:
        axes.axhline(baseline, color="0.4", linestyle="--", linewidth=1, label="dense")
    axes.set_xlabel("MACs kept (fraction of dense)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()

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
