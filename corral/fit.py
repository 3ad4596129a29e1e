"""Tables that fit a terminal's width, for ``corral top``: no row wraps.

Each column is text (a name: cut with an ellipsis down to its least
width) or a number (kept whole). A table too wide for the terminal first
cuts its text columns, and only when even their least widths do not fit
drops columns, the least important first (each column says when it goes).
What is left of the width then goes back to the text columns that want it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rich.cells import cell_len, set_cell_size

ELLIPSIS = "…"


@dataclass
class Column:
    """One column: its header and cells. ``text`` columns are cut to fit
    (``cut`` "end" keeps the start, "start" keeps the end: a worker id's
    pid), down to ``least`` cells; numbers never are. ``drop`` orders the
    columns that may go (1 goes first; 0 never goes); a dropped ``fold``
    column's cells are kept, in parentheses, after the first column's:
    ``tails``, kept however that cell is cut (" (paused)")."""

    header: str
    cells: list[str]
    text: bool = False
    least: int = 0
    drop: int = 0
    cut: Literal["end", "start"] = "end"
    right: bool = False
    fold: bool = False
    tails: list[str] = field(default_factory=list)

    def natural(self) -> int:
        tails = self.tails or [""] * len(self.cells)
        shown = [cell_len(cell + tail) for cell, tail in zip(self.cells, tails, strict=True)]
        return max([cell_len(self.header), *shown])

    def least_width(self) -> int:
        return (
            min(self.natural(), max(self.least, cell_len(self.header)))
            if self.text
            else (self.natural())
        )

    def cell(self, row: int, width: int) -> str:
        tail = self.tails[row] if self.tails else ""
        return clip(self.cells[row], width - cell_len(tail), self.cut) + tail


def clip(text: str, width: int, cut: str = "end") -> str:
    """``text`` in at most ``width`` cells, an ellipsis marking what was cut."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    if cut == "start":
        kept = text
        while cell_len(kept) > width - 1:
            kept = kept[1:]
        if "/" in kept[1:]:  # start at a part's edge: "…/default#0/123", not "…l/default#0/123"
            kept = kept[kept.index("/", 1) :]
        return ELLIPSIS + kept
    return set_cell_size(text, width - 1).rstrip() + ELLIPSIS


def choose(columns: list[Column], width: int, chrome: int, gap: int) -> list[Column]:
    """The columns that fit in ``width`` at their least widths (a table
    takes ``chrome`` cells at its edges and ``gap`` between columns),
    dropping those with the lowest ``drop`` first."""
    kept = list(columns)
    order = sorted((c for c in columns if c.drop), key=lambda c: c.drop)
    while _least(kept, chrome, gap) > width and order:
        kept.remove(order.pop(0))
    return kept


def widths(columns: list[Column], width: int, chrome: int, gap: int) -> list[int]:
    """Each column's width: numbers their own, text its least plus a share
    of what is left, as much as it wants."""
    sizes = [c.least_width() for c in columns]
    spare = width - _least(columns, chrome, gap)
    wants = [c.natural() - size if c.text else 0 for c, size in zip(columns, sizes, strict=True)]
    total = sum(wants)
    if spare <= 0 or total == 0:
        return sizes
    given = [min(want, spare * want // total) for want in wants]
    left = min(spare, total) - sum(given)
    for i, want in enumerate(wants):  # what rounding left, in column order
        extra = min(left, want - given[i])
        given[i] += extra
        left -= extra
    return [size + extra for size, extra in zip(sizes, given, strict=True)]


def _least(columns: list[Column], chrome: int, gap: int) -> int:
    return chrome + gap * max(0, len(columns) - 1) + sum(c.least_width() for c in columns)


def fitted_table(title: str, columns: list[Column], width: int) -> Any:
    """A rich table of ``columns`` in ``width`` cells, one line a row."""
    from rich import box
    from rich.table import Table

    chrome, gap = 2, 3  # box.SIMPLE_HEAD with its edge: " " each side, "   " between
    kept = choose(columns, width, chrome, gap)
    for gone in (c for c in columns if c.fold and c not in kept):
        first = kept[0]
        tails = first.tails or [""] * len(first.cells)
        folded = zip(tails, gone.cells, strict=True)
        first.tails = [tail + (f" ({cell})" if cell else "") for tail, cell in folded]
    sizes = widths(kept, width, chrome, gap)
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=True
    )
    for column, size in zip(kept, sizes, strict=True):
        table.add_column(
            clip(column.header, size),
            justify="right" if column.right else "left",
            width=size,
            no_wrap=True,
            overflow="ellipsis",
        )
    rows = len(columns[0].cells) if columns else 0
    for row in range(rows):
        table.add_row(*(c.cell(row, size) for c, size in zip(kept, sizes, strict=True)))
    return table
