"""The bare `transferlab train --data DIR --out RUN` on the real photo sets: are the defaults near the best?

    .venv/bin/python benchmarks/defaults.py [--data ../shared/data/cats-vs-dogs ../shared/data/flowers]

Each set trains with every option at its default and a fresh feature cache (a first run's time, scanning and
building included), and prints its validation accuracy and minutes against the goals of issue #12:
>= 0.99 on cats vs dogs, >= 0.95 on flowers, at most 15 minutes. Runs and cache go to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import transferlab as tl

SHARED = Path(__file__).resolve().parents[2] / "shared/data"
GOALS = {"cats-vs-dogs": 0.99, "flowers": 0.95}
MINUTES = 15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=[str(SHARED / name) for name in GOALS])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in map(Path, args.data):
            started = time.perf_counter()
            run = tl.train(folder, out=Path(tmp) / folder.name, cache_dir=str(Path(tmp) / f"cache-{folder.name}"))
            rows.append((folder.name, run.metrics["accuracy"], (time.perf_counter() - started) / 60))
    config = run.config
    print(f"defaults: {config.backbone}, {config.strategy}, last {config.unfreeze_blocks} block(s), "
          f"{config.epochs} epochs a stage, augment {config.augment}")
    for name, accuracy, minutes in rows:
        goal = GOALS.get(name)
        verdict = "" if goal is None else f" (goal >= {goal}: {'met' if accuracy >= goal else 'MISSED'})"
        print(f"{name}: val accuracy {accuracy:.4f}{verdict}, {minutes:.1f} min "
              f"(goal <= {MINUTES}: {'met' if minutes <= MINUTES else 'MISSED'})")


if __name__ == "__main__":
    main()
