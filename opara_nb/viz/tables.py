"""Tables that fit the page: columns without a single value are left out (on a CPU most GPU columns are empty)."""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["EMPTY", "drop_empty_columns"]

EMPTY = ("", "-", None)


def drop_empty_columns(headers: Sequence[str], rows: Sequence[Sequence[Any]], keep: Sequence[str] = ()
                       ) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) without the columns whose every cell is empty ("", "-" or None); ``keep`` names columns
    kept regardless (e.g. the one that says what a row is).

    >>> drop_empty_columns(["mode", "GPU ms", "sync ms"], [["eager", "-", "1.0"], ["opara", "-", "1.2"]])
    (['mode', 'sync ms'], [['eager', '1.0'], ['opara', '1.2']])
    """
    used = [i for i, h in enumerate(headers)
            if h in keep or any(i < len(r) and r[i] not in EMPTY for r in rows)]
    return [headers[i] for i in used], [[r[i] if i < len(r) else "" for i in used] for r in rows]
