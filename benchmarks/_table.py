"""What the benchmark scripts share: print a markdown table and write it where ``--md`` says."""
from __future__ import annotations


def emit(lines: list[str], path: str | None) -> None:
    text = "\n".join(lines)
    print(text)
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
