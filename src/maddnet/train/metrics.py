"""Accuracy counting and JSON-lines metric files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """For logits (N, classes) and labels (N,): how many labels are among the k highest
    logits, for each k (k is capped at the number of classes)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return [int(hits[:, : min(k, max_k)].any(dim=1).sum()) for k in ks]


class JsonlWriter:
    """Appends one JSON object per line to ``path``; the file stays valid after a kill."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "ab+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    # a write cut short by a kill: end that line, or this record would join it
                    # and be lost with it when read back
                    line = "\n" + line
            handle.write(line.encode())

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` > the given step (written after the checkpoint a
        resumed run starts from, so they would appear twice)."""
        if not self.path.exists():
            return
        kept = [line for line in self.read() if line.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return records
