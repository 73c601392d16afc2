#!/usr/bin/env python
"""Print a Markdown table of the baseline runs in results/baselines/ (one row per run:
final test top-1/top-5, epochs, steps, measured wall time, parameters)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(root: Path) -> list[str]:
    lines = [
        "| run | model | data | top-1 | top-5 | epochs | steps | wall time | parameters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        config = json.loads((run / "config.json").read_text())
        results_file = run / "results.json"
        if results_file.exists():
            r = json.loads(results_file.read_text())
            lines.append(
                f"| {run.name} | {config['model']} {config['model_kwargs'] or ''} | "
                f"{config['dataset']} | {100 * r['top1']:.2f} % | {100 * r['top5']:.2f} % | "
                f"{r['epochs']:g} | {r['step']} | {r['wall_time_s'] / 60:.1f} min | "
                f"{r['num_parameters']:,} |"
            )
        else:
            evals = (
                [
                    json.loads(line)
                    for line in (run / "metrics.jsonl").read_text().splitlines()
                    if '"eval"' in line
                ]
                if (run / "metrics.jsonl").exists()
                else []
            )
            last = evals[-1] if evals else None
            status = (
                f"unfinished: epoch {last['epoch']}/{config['epochs']:g}, top-1 {100 * last['top1']:.2f} %"
                if last
                else "unfinished"
            )
            lines.append(f"| {run.name} | {config['model']} | {config['dataset']} | {status} | | | | | |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--root", default=str(Path(__file__).resolve().parent.parent / "results" / "baselines")
    )
    args = parser.parse_args()
    print("\n".join(rows(Path(args.root))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
