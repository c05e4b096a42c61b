"""Inference speed end to end, from a JPEG file on disk to a label, for each engine, measured in one run.

    .venv/bin/python benchmarks/inference.py [--data DIR] [--single 200] [--batches 4]

For tf_efficientnet_lite0 (ImageNet weights) and resnet50 (weights none: the speed does not depend on them), each
a feature-extraction run trained for one epoch on 64 of the photos, so that the int8 copy is calibrated on photos:
  PyTorch eager fp32 and bf16: the run's model as `Run.predict` has it (BatchNorm folded, channels_last), fed by the
      training pipeline's decoding (torchvision), under inference_mode (bf16: autocast)
  ONNX Runtime fp32 and int8: the files `transferlab export --quantize int8` writes, fed by `images.prepare`
      (NumPy + Pillow), as `transferlab predict MODEL.onnx` does
Batch 1: p50 and p95 milliseconds per photo over --single photos (after 3 to warm up), and images/s.
Batch 32: images/s over --batches batches. bf16 is far slower on a CPU without bf16 instructions (AVX2 here), so it
runs on a tenth of the photos and one batch. Photos: DIR/validation and DIR/train (default: the shared
cats-vs-dogs photos), else synthetic 500x375 JPEGs.

Goals for tf_efficientnet_lite0: ONNX Runtime batch-1 p50 <= 10 ms end to end; ONNX Runtime >= 1.5x PyTorch
eager's batch-1 images/s (both fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import transferlab as tl
from transferlab import feeds, images
from transferlab.export import export
from transferlab.exported import ExportedModel
from transferlab.predict import probabilities

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cats-vs-dogs"
MODELS = {"tf_efficientnet_lite0": "imagenet", "resnet50": "none"}


def synthetic(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        name = folder / ("cats", "dogs")[i % 2] / f"{i}.jpg"
        name.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(name, quality=90)
        paths.append(name)
    return paths


def training_folder(data_dir: Path | None, tmp: Path) -> Path:
    """64 photos in two classes: links to the first 32 of each class of `data_dir`/train, or made."""
    if data_dir is None:
        synthetic(tmp / "train", 64)
        return tmp / "train"
    for folder in sorted(p for p in (data_dir / "train").iterdir() if p.is_dir())[:2]:
        (tmp / "train" / folder.name).mkdir(parents=True)
        for f in images.find([folder])[:32]:
            (tmp / "train" / folder.name / f.name).symlink_to(f)
    return tmp / "train"


def torch_engine(run: tl.Run, bf16: bool) -> Callable[[list[Path]], list[str]]:
    pre, transform, model = run.preprocessing, feeds.transforms(run.preprocessing), run.model.eval()
    precision = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()

    def labels(files: list[Path]) -> list[str]:
        x = torch.stack([transform(images.load_image(f, run.config.max_pixels, draft=pre.resize)) for f in files])
        with torch.inference_mode(), precision:
            p = probabilities(model(x.contiguous(memory_format=torch.channels_last)))
        return [run.classes[k] for k in p.argmax(1).tolist()]

    return labels


def onnx_engine(path: Path) -> Callable[[list[Path]], list[str]]:
    model = ExportedModel(path)

    def labels(files: list[Path]) -> list[str]:
        batch = np.stack([images.prepare(images.load_image(f, model.max_pixels, draft=model.preprocessing.resize),
                                         model.preprocessing) for f in files])
        return [model.classes[k] for k in model.probabilities(batch).argmax(1)]

    return labels


def decode_only(pre: images.Preprocessing) -> Callable[[list[Path]], list]:
    return lambda files: [images.prepare(images.load_image(f, draft=pre.resize), pre) for f in files]


def measure(labels: Callable[[list[Path]], list], photos: list[Path], single: int, batches: int) -> dict:
    labels(photos[:3])
    for f in photos[:3]:
        labels([f])
    times = []
    for f in photos[:single]:
        began = time.perf_counter()
        labels([f])
        times.append(time.perf_counter() - began)
    ms = np.array(times) * 1000
    began = time.perf_counter()
    for b in range(batches):
        labels([photos[(b * 32 + i) % len(photos)] for i in range(32)])
    return {"p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95), "single_ips": len(ms) / ms.sum() * 1000,
            "batch_ips": 32 * batches / (time.perf_counter() - began), "n": len(ms), "batches": batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else None)
    parser.add_argument("--single", type=int, default=200, help="photos timed one at a time")
    parser.add_argument("--batches", type=int, default=4, help="batches of 32 timed")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; onnxruntime "
          f"{__import__('onnxruntime').__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = images.find([args.data / "validation"]) if args.data else synthetic(tmp / "photos", 64)
        photos = [photos[i] for i in np.random.default_rng(0).permutation(len(photos))]
        print(f"{len(photos)} photos from {args.data / 'validation' if args.data else 'synthetic'}")
        train = training_folder(args.data, tmp)
        for backbone, weights in MODELS.items():
            run = tl.train(train, out=tmp / backbone, backbone=backbone, weights=weights, strategy="feature-extraction",
                           epochs=1, amp="off", cache_dir=str(tmp / "cache"), workers=0)
            done = export(run, quantize="int8")
            engines = {"decode + resize + crop only": decode_only(run.preprocessing),
                       "PyTorch eager fp32": torch_engine(run, bf16=False),
                       "PyTorch eager bf16": torch_engine(run, bf16=True),
                       "ONNX Runtime fp32": onnx_engine(done.path), "ONNX Runtime int8": onnx_engine(done.int8)}
            for name, engine in engines.items():
                slow = "bf16" in name
                rows.append((backbone, name, measure(engine, photos, args.single // 10 if slow else args.single,
                                                     1 if slow else args.batches)))
                print(f"  measured {backbone}, {name}", flush=True)
    print(f"\n{'model':<23}{'engine':<29}{'batch 1: p50 ms':>16}{'p95 ms':>8}{'images/s':>10}"
          f"{'batch 32: images/s':>20}  (photos timed at batch 1, batches)")
    for backbone, name, m in rows:
        print(f"{backbone:<23}{name:<29}{m['p50']:>16.1f}{m['p95']:>8.1f}{m['single_ips']:>10.1f}"
              f"{m['batch_ips']:>20.1f}  ({m['n']}, {m['batches']})")
    by = {(b, n): m for b, n, m in rows}
    ort, eager = by["tf_efficientnet_lite0", "ONNX Runtime fp32"], by["tf_efficientnet_lite0", "PyTorch eager fp32"]
    ratio = ort["single_ips"] / eager["single_ips"]
    print(f"\ngoal: tf_efficientnet_lite0, ONNX Runtime fp32 batch-1 p50 {ort['p50']:.1f} ms <= 10 ms: "
          f"{'met' if ort['p50'] <= 10 else 'MISSED'}")
    print(f"goal: tf_efficientnet_lite0, ONNX Runtime / PyTorch eager batch-1 images/s (fp32) {ratio:.2f} >= 1.5: "
          f"{'met' if ratio >= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
