"""Exported models against the PyTorch run they come from, on the run's validation photos.

    .venv/bin/python benchmarks/parity.py RUN_DIR

1. fp32, same input (the training pipeline's uint8 batches): largest probability difference between ONNX Runtime
   and PyTorch (fp32, no autocast), and labels that differ                      goal <= 1e-4, none
2. int8 against fp32: validation accuracy of each (as `transferlab export --quantize int8` prints it)
                                                                                goal within 0.5 pt
3. end to end, `predict MODEL.onnx` (NumPy + Pillow preprocessing) against `predict RUN_DIR` (torchvision):
   pixels of the prepared images, labels that differ, largest probability difference
The exported files go to a temporary folder; the run directory is only read.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import transferlab as tl
from transferlab import data, feeds, images
from transferlab.export import export
from transferlab.exported import ExportedModel
from transferlab.predict import probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    run = tl.load(parser.parse_args().run_dir)
    pre = run.preprocessing
    val = [Path(r["path"]) for r in run.split if r["split"] == "val"]
    with tempfile.TemporaryDirectory() as tmp:
        done = export(run, Path(tmp) / "model.onnx", quantize="int8")
        fp32 = ExportedModel(done.path)
        dataset = feeds.ImageDataset(data.ImageSet(Path("."), run.classes, val, [0] * len(val)), pre)
        worst, differ, pixels = 0.0, 0, []
        for start in range(0, len(val), 32):
            x = torch.stack([dataset[i][0] for i in range(start, min(start + 32, len(val)))])
            with torch.inference_mode():
                expected = probabilities(run.model(x.to(next(run.model.parameters()).device))).cpu().numpy()
            got = fp32.probabilities(x.numpy())
            worst = max(worst, float(np.abs(got - expected).max()))
            differ += int((got.argmax(1) != expected.argmax(1)).sum())
            pixels += [np.abs(images.prepare(images.load_image(f, draft=pre.resize), pre).astype(int) - t.numpy())
                       for f, t in zip(val[start:start + 32], x)]
        print(f"{run.path}: {run.config.backbone}, {len(val)} validation photos")
        print(f"1. fp32, same input: largest probability difference {worst:.2g} (goal <= 1e-4: "
              f"{'met' if worst <= 1e-4 else 'MISSED'}), labels that differ: {differ}")
        a = done.accuracy
        gap = 100 * (a["fp32"] - a["int8"])
        print(f"2. accuracy on {done.validation_images} photos: fp32 {a['fp32']:.4f}, int8 {a['int8']:.4f} "
              f"({gap:.2f} pt lower; goal <= 0.5: {'met' if gap <= 0.5 else 'MISSED'}); calibrated on "
              f"{done.calibration_images} training photos")
        from_file, from_run = fp32.predict(val), run.predict(val)
        labels = sum(a["label"] != b["label"] for a, b in zip(from_file, from_run))
        diff = max(abs(a["probability"] - b["probability"]) for a, b in zip(from_file, from_run))
        every = np.concatenate([p.ravel() for p in pixels])
        print(f"3. end to end: pixels differ by at most {every.max()} levels ({100 * (every > 0).mean():.2f}% of "
              f"values differ, {100 * (every > 1).mean():.4f}% by more than 1); labels that differ: {labels}; "
              f"largest probability difference {diff:.2g}")


if __name__ == "__main__":
    main()
