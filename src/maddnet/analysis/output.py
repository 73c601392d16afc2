"""Writing results: CSV rows and a headless matplotlib (plots are optional)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One CSV row per dict; the header is the union of the keys, in first-seen order."""
    path = Path(path)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def pyplot_or_none():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib
    is not installed (plots are then skipped; the JSON/CSV/Markdown files still get written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
