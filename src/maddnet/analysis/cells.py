"""Finished cells of a single-layer analysis, kept on disk so that a rerun skips them.

A single-layer analysis of a large model is hours of (layer, C) cells (ResNet-50: 54 layers
at two C). :class:`CellLog` appends each finished row to ``cells.rank<r>.jsonl`` in the
output folder (one file per rank, so ranks never write the same file) as soon as it is
measured, beside ``cells_settings.json``: the settings the rows were computed with. A
rerun with the same settings loads the finished rows and computes only the others; a rerun
with other settings is refused, since its rows would mix two experiments.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..nn.spec import LayerSpec, former_trees_hint
from ..train.metrics import JsonlWriter

SETTINGS_FILE = "cells_settings.json"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file (read in 1 MiB pieces): identifies the weights a set
    of cells was measured on, whatever the path. Raises FileNotFoundError for a missing
    file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


class CellLog:
    """The rows of one analysis folder: ``load`` the finished ones, ``append`` new ones.

    Args:
        folder: the analysis output folder (created on first use).
        settings: JSON-serialisable description of everything a row depends on (model,
            weights, data, split, recording and layer settings); not the layer list, the
            widths or the thread count, so a rerun may add layers or C values.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict[str, Any]):
        self.folder = Path(folder)
        # as it reads back from JSON (tuples become lists), so that equal settings compare equal
        self.settings = json.loads(json.dumps(settings, sort_keys=True))

    def load(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Rows already finished here, keyed by (layer, C).

        Raises:
            ValueError: the folder's rows were computed with other settings (names the
                differing keys and the files to remove).
        """
        path = self.folder / SETTINGS_FILE
        if path.exists():
            stored = json.loads(path.read_text())
            if isinstance(stored.get("spec"), dict):
                # read as the cells were made: a field added since takes its former value
                spec = LayerSpec.from_saved(stored["spec"]).to_dict()
                stored["spec"] = json.loads(json.dumps(spec, sort_keys=True))
            if stored != self.settings:
                keys = sorted(
                    k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k)
                )
                spec_keys: set[str] = set()
                if keys == ["spec"] and isinstance(self.settings.get("spec"), dict):
                    new = self.settings["spec"]
                    spec_keys = {
                        k for k in set(stored["spec"]) | set(new) if stored["spec"].get(k) != new.get(k)
                    }
                raise ValueError(
                    f"{self.folder}: its finished single-layer cells were computed with other "
                    f"settings (differing: {', '.join(keys)}); use another --out, or delete "
                    f"{path} and {self.folder}/cells.rank*.jsonl to start over"
                    f"{former_trees_hint(spec_keys)}"
                )
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for part in sorted(self.folder.glob("cells.rank*.jsonl")):
            for row in JsonlWriter(part).read():  # a line cut short by a kill is skipped
                rows[(row["layer"], int(row["C"]))] = row
        return rows

    def append(self, rank: int, row: dict[str, Any]) -> None:
        """Add one finished row (this rank's own file); the settings are recorded with the
        first row, so a run that finished no cell leaves the folder free."""
        path = self.folder / SETTINGS_FILE
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.settings, indent=2, sort_keys=True))
            os.replace(tmp, path)  # never a half-written settings file
        JsonlWriter(self.folder / f"cells.rank{rank}.jsonl").write(row)
