"""Scaling benchmark: the same `transferlab train` in one process and data-parallel under torchrun, as ratios
measured in one run.

    .venv/bin/python benchmarks/scale.py [--data ../shared/data/cats-vs-dogs] [--processes 1,2]
                                         [--strategies full,partial] [--epochs 2] [--batch-size 32] [--device cpu]

One process runs as `python -m transferlab train ...`; N processes as `torchrun --standalone --nproc-per-node N
-m transferlab train ...` (on a GPU machine, one process per GPU: `--device cuda --processes 1,2,4,8`).
--batch-size is per process, so N processes step on N times the images (weak scaling). Every run gets a fresh
feature cache, so partial fine-tuning's figures include computing the frozen-prefix features, shared out.

Per strategy and process count it prints: the whole command's wall time; the run's training time (config.json:
caching and every epoch, after start-up and the scan); training images/s over the epochs (each epoch's
seconds include its validation pass), in all and per process (per GPU); the scaling efficiency
(images/s / (N x one process's)); and validation accuracy. On a CPU the processes share the same cores
(torchrun gives each one thread where one process has them all), so more processes cannot be faster there:
the ratio says what the coordination costs.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from transferlab.devices import resolve
from transferlab.config import TrainConfig


def train(processes: int, strategy: str, args: argparse.Namespace, tmp: Path) -> dict:
    """One `transferlab train` run with `processes` processes; its timings from its run directory."""
    out = tmp / f"{strategy}-{processes}"
    argv = ["train", "--data", args.data, "--out", str(out), "--strategy", strategy, "--epochs", str(args.epochs),
            "--patience", "0", "--batch-size", str(args.batch_size), "--device", args.device, "--amp", "off",
            "--cache-dir", str(tmp / f"cache-{strategy}-{processes}")]
    launcher = [sys.executable, "-m", "transferlab"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
        "-m", "transferlab"]
    began = time.perf_counter()
    done = subprocess.run(launcher + argv, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"{' '.join(launcher + argv)} failed:\n{done.stderr[-3000:]}")
    info = json.loads((out / "config.json").read_text())
    history = list(csv.DictReader((out / "history.csv").open()))
    images = sum(info["data"]["counts"]["train"].values()) * len(history)
    return {"strategy": strategy, "processes": processes, "wall": wall, "train": info["train_seconds"],
            "images_per_s": images / sum(float(h["seconds"]) for h in history),
            "val_accuracy": json.loads((out / "metrics.json").read_text())["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cats-vs-dogs"))
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts; 1 must be first")
    parser.add_argument("--strategies", default="full,partial")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for one process per GPU")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    if counts[0] != 1:
        sys.exit("--processes must start with 1: the other counts are measured against it")
    if args.device == "cuda" and max(counts) > torch.cuda.device_count():
        sys.exit(f"--processes {args.processes}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    print(f"device: {resolve(TrainConfig(data=args.data, device=args.device, amp='off')).summary()}, "
          f"torch {torch.__version__}; batch {args.batch_size} per process, {args.epochs} epochs")
    print(f"{'strategy':<10}{'processes':>10}{'wall s':>9}{'train s':>9}{'img/s':>9}{'img/s per process':>19}"
          f"{'efficiency':>12}{'val acc':>9}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies.split(","):
            for n in counts:
                r = train(n, strategy, args, Path(tmp))
                one = next(x for x in rows + [r] if x["strategy"] == strategy and x["processes"] == 1)
                r["efficiency"] = r["images_per_s"] / (n * one["images_per_s"])
                rows.append(r)
                print(f"{strategy:<10}{n:>10}{r['wall']:>9.1f}{r['train']:>9.1f}{r['images_per_s']:>9.1f}"
                      f"{r['images_per_s'] / n:>19.1f}{r['efficiency']:>12.2f}{r['val_accuracy']:>9.4f}", flush=True)
    print()
    for r in rows:
        if r["processes"] > 1:
            one = next(x for x in rows if x["strategy"] == r["strategy"] and x["processes"] == 1)
            print(f"{r['strategy']}: {r['processes']} processes / 1: training images/s "
                  f"{r['images_per_s'] / one['images_per_s']:.2f}, training time {r['train'] / one['train']:.2f}, "
                  f"wall time {r['wall'] / one['wall']:.2f}")


if __name__ == "__main__":
    main()
