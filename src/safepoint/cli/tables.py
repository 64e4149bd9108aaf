"""Tables that fit the terminal: text columns fold, the others keep their whole width, and
when even that is too wide the least important columns are left out (and said so).

A size, a step number or an age is never cut ("8.1 K" for "8.1 KiB"): a column that cannot
wrap gets its full width or is not shown at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table
from rich.text import Text

GAP = 2
"""Spaces between two columns."""


@dataclass(frozen=True)
class Column:
    """One column of a :func:`fit` table."""

    header: str
    justify: JustifyMethod = "left"
    wrap: bool = False
    """Whether its cells may fold onto several lines (names, paths, errors)."""
    min_width: int = 10
    """The narrowest a wrapping column gets before columns are left out."""
    drop: int = 0
    """The order in which columns go when the table does not fit: 1 first, then 2, ...;
    0 never."""


def plain_width(cell: str) -> int:
    """The width a cell (rich markup) takes on screen, its widest line."""
    return max((Text.from_markup(line).cell_len for line in cell.split("\n")), default=0)


def _natural(column: Column, cells: Sequence[str]) -> int:
    return max([plain_width(escape(column.header)), *(plain_width(c) for c in cells)])


def _needed(column: Column, natural: int) -> int:
    return min(natural, column.min_width) if column.wrap else natural


def fit(title: str | None, columns: Sequence[Column], rows: Sequence[Sequence[str]],
        width: int) -> tuple[Table, list[str]]:
    """A table of ``rows`` (cells in rich markup) no wider than ``width``, and the headers
    of the columns left out to make it fit."""
    naturals = [_natural(c, [row[i] for row in rows]) for i, c in enumerate(columns)]
    shown = list(range(len(columns)))

    def needed(indexes: list[int]) -> int:
        return sum(_needed(columns[i], naturals[i]) for i in indexes) + GAP * (len(indexes) - 1)

    droppable = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: columns[i].drop)
    while needed(shown) > width and droppable:
        shown.remove(droppable.pop(0))
    rigid = sum(naturals[i] for i in shown if not columns[i].wrap)
    flexible = sorted((i for i in shown if columns[i].wrap), key=lambda i: naturals[i])
    room = width - rigid - GAP * (len(shown) - 1)
    widths: dict[int, int] = {}
    for k, i in enumerate(flexible):  # the narrowest first: what they leave goes to the others
        share = max(columns[i].min_width, room // (len(flexible) - k))
        widths[i] = min(naturals[i], share)
        room -= widths[i]
    table = Table(box=box.SIMPLE_HEAD, padding=(0, GAP - 1, 0, 0), pad_edge=False,
                  show_edge=False, title=title, title_justify="left")
    for i in shown:
        column = columns[i]
        if column.wrap:
            table.add_column(escape(column.header), justify=column.justify, overflow="fold",
                             max_width=widths[i], min_width=min(widths[i], column.min_width))
        else:
            table.add_column(escape(column.header), justify=column.justify, no_wrap=True,
                             min_width=naturals[i])
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table, [columns[i].header for i in range(len(columns)) if i not in shown]


def print_table(console: Console, title: str | None, columns: Sequence[Column],
                rows: Sequence[Sequence[str]]) -> None:
    """:func:`fit` to the console's width, printed under its title and a blank line, then
    a blank line, and a note of the columns left out."""
    table, left_out = fit(None, columns, rows, console.width)
    if title:
        console.print(title)
        console.print()
    console.print(table)
    console.print()
    if left_out:
        console.print(f"[dim]({', '.join(left_out)} left out to fit {console.width} columns; "
                      "--json has everything)[/]")


__all__ = ["Column", "fit", "plain_width", "print_table"]
