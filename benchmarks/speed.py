"""Speed benchmark: what the frozen-prefix cache, bf16 and channels_last buy, as ratios from one run.

    .venv/bin/python benchmarks/speed.py [--data ../shared/data/cats-vs-dogs] [--epochs 3] [--subset 320]

1. feature extraction, 10 epochs vs 1 epoch (early stopping off)            goal <= 1.3
2. whole-pipeline images/s (decode + model) vs model-only images/s, best of 3   goal >= 0.85
   and a full fine-tuning step with fp32 depthwise gradients vs plain bf16 autocast (`precision`)
3. partial (last block) vs full fine-tuning, seconds per epoch, VGG16 and EfficientNet-Lite0
4. feature-extraction + partial + full vs the notebook way (frozen backbone re-run every epoch, fp32,
   no cache) at the same epochs                                             goal >= 5x at accuracy within 0.5 pt
Every training run gets a fresh feature cache, so nothing is reused from an earlier run; in 4 the three share
one cache and train in `compare`'s order.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from transferlab import data
from transferlab.cache import FeatureCache
from transferlab.compare import training_order
from transferlab.config import TrainConfig
from transferlab.training import autocast, build_model, image_loader, load_splits, loss_fn, train

RAM = 8 * 2**30


def timed_train(config: TrainConfig, splits, store: FeatureCache | None = None):
    """(seconds, run) for one training run on preloaded splits, with a fresh cache unless one is shared."""
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        run = train(config, splits=splits, store=store or FeatureCache(Path(tmp), RAM))
        return time.perf_counter() - began, run


def subset(splits, n: int):
    """The first n/2 images of each class (a deterministic, balanced subset) for the slow backbones."""
    picks = [i for c in range(len(splits.train.classes))
             for i in [j for j, y in enumerate(splits.train.labels) if y == c][: n // 2]]
    val = [i for c in range(len(splits.val.classes))
           for i in [j for j, y in enumerate(splits.val.labels) if y == c][: n // 8]]
    return replace(splits, train=splits.train.subset(picks), val=splits.val.subset(val))


def alternating_best(a: Callable[[], float], b: Callable[[], float], rounds: int = 3) -> tuple[float, float]:
    """The best images/s of each of a and b, measured alternately: on a noisy machine the least disturbed."""
    timings = [(a(), b()) for _ in range(rounds)]
    return max(x for x, _ in timings), max(y for _, y in timings)


def images_per_second(config: TrainConfig, images: data.ImageSet) -> tuple[float, float]:
    """(pipeline, model-only) images/s for the frozen-backbone pass that fills the cache."""
    built = build_model(config, 2)
    model = built.model.eval()

    def run(batches) -> float:
        began = time.perf_counter()
        with torch.no_grad(), autocast(config.bf16):
            for x, _ in batches:
                model.features(x.contiguous(memory_format=torch.channels_last))
        return len(images) / (time.perf_counter() - began)

    in_memory = list(image_loader(images, built.pre, config))  # decoded once, then timed without any decoding
    run(in_memory[:2])  # warm-up
    return alternating_best(lambda: run(image_loader(images, built.pre, config)), lambda: run(in_memory))


def step_speedup(config: TrainConfig, batches: int = 6) -> tuple[float, float]:
    """Images/s of a full fine-tuning step under plain bf16 autocast vs transferlab's (fp32 depthwise
    gradients), alternating, best of 3; BatchNorm is folded in both."""
    model = build_model(config, 2).model
    model.freeze(0, bn_frozen=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randint(0, 256, (config.batch_size, 3, 224, 224), dtype=torch.uint8)
    x, y = x.contiguous(memory_format=torch.channels_last), torch.randint(0, 2, (config.batch_size,))

    def run(context) -> float:
        began = time.perf_counter()
        for _ in range(batches):
            with context():
                loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return batches * config.batch_size / (time.perf_counter() - began)

    plain = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    ours = lambda: autocast(True)  # noqa: E731
    run(ours)  # warm-up
    return alternating_best(lambda: run(plain), lambda: run(ours))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cats-vs-dogs"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per strategy in comparison 4")
    parser.add_argument("--subset", type=int, default=320, help="training images for comparison 3")
    args = parser.parse_args()
    base = TrainConfig(data=f"{args.data}/train", val=f"{args.data}/validation", backbone="tf_efficientnet_lite0",
                       patience=0)
    splits = load_splits(base)
    rows = []

    # 1. feature extraction, 10 epochs vs 1
    fe = replace(base, strategy="feature-extraction")
    one, _ = timed_train(replace(fe, epochs=1), splits)
    ten, _ = timed_train(replace(fe, epochs=10), splits)
    rows.append(("feature extraction: 10 epochs / 1 epoch, time", ten / one, "<= 1.3", ten / one <= 1.3,
                 f"{one:.1f}s vs {ten:.1f}s"))

    # 2. pipeline vs model-only throughput
    pipeline, model_only = images_per_second(base, splits.train.subset(range(0, len(splits.train), 2)))
    rows.append(("pipeline / model-only, images/s", pipeline / model_only, ">= 0.85", pipeline / model_only >= 0.85,
                 f"{pipeline:.1f} vs {model_only:.1f} img/s"))

    # 2b. what computing depthwise gradients in fp32 buys a full fine-tuning step
    plain, ours = step_speedup(base)
    rows.append(("full fine-tuning step: transferlab / plain bf16 autocast, img/s", ours / plain, "", True,
                 f"{ours:.1f} vs {plain:.1f} img/s, batch {base.batch_size}"))

    # 3. partial (last block) vs full, seconds per epoch
    small = subset(splits, args.subset)
    for backbone, weights in (("vgg16", "none"), ("tf_efficientnet_lite0", "imagenet")):
        config = replace(base, backbone=backbone, weights=weights, epochs=1)
        partial_total, partial = timed_train(replace(config, strategy="partial", unfreeze_blocks=1), small)
        _, full = timed_train(replace(config, strategy="full"), small)
        p, f = partial.history[-1]["seconds"], full.history[-1]["seconds"]
        rows.append((f"{backbone}: partial (last block) / full, s per epoch", p / f, "", True,
                     f"{p:.1f}s vs {f:.1f}s on {len(small.train)} images; partial's one-off cache "
                     f"{partial_total - p:.1f}s"))

    # 4. the three strategies, ours vs the notebook way
    ours_total, notebook_total, accuracy = 0.0, 0.0, []
    with tempfile.TemporaryDirectory() as tmp:
        shared = FeatureCache(Path(tmp), RAM)  # one cache for the three, as in `compare`
        configs = {s: replace(base, strategy=s, epochs=args.epochs) for s in ("feature-extraction", "partial", "full")}
        for strategy in training_order(configs):  # as compare trains them: partial's prefix then serves both
            config = configs[strategy]
            ours, ours_run = timed_train(config, splits, shared)
            notebook, notebook_run = timed_train(replace(config, cache=False, bf16=False, channels_last=False), splits)
            ours_total += ours
            notebook_total += notebook
            accuracy.append((strategy, ours_run.metrics["accuracy"], notebook_run.metrics["accuracy"], ours, notebook))
    worst = max(abs(a - b) for _, a, b, _, _ in accuracy)
    rows.append((f"notebook way / transferlab, fe+partial+full x{args.epochs} epochs", notebook_total / ours_total,
                 ">= 5", notebook_total / ours_total >= 5 and worst <= 0.005,
                 f"{notebook_total:.0f}s vs {ours_total:.0f}s; max accuracy gap {100 * worst:.2f} pt"))

    print(f"\n{'measure':<62}{'ratio':>8}  {'goal':<8}{'met':<5}detail")
    for name, ratio, goal, ok, detail in rows:
        print(f"{name:<62}{ratio:>8.2f}  {goal:<8}{('yes' if ok else 'NO') if goal else '':<5}{detail}")
    print(f"\n{'strategy':<20}{'acc ours':>9}{'acc notebook':>14}{'s ours':>8}{'s notebook':>12}")
    for strategy, a, b, s_ours, s_nb in accuracy:
        print(f"{strategy:<20}{a:>9.4f}{b:>14.4f}{s_ours:>8.0f}{s_nb:>12.0f}")
    print(f"\nCPU threads {torch.get_num_threads()}, numpy {np.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
