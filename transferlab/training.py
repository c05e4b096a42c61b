"""The fit loop: stages of epochs with early stopping, best-epoch restore and checkpoints, and a whole run around
it (prepare, train each stage, evaluate, record).

The loop knows nothing about devices, decoding or caching: it is given a `devices.Device` for autocast and
loss scaling, and a `feeds.Feed` whose batches are already on that device. Under torchrun (`distributed`) it
trains the DDP-wrapped trained part on this process's batches, and every number it decides on is summed over
the processes first; only the main process writes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import backbones, devices, distributed, metrics
from .cache import FeatureCache
from .config import TrainConfig
from .devices import Device
from .errors import TransferlabError
from .feeds import Feed, Features, ImageFeed, feature_store
from .model import Classifier, create_classifier
from .predict import probabilities
from .progress import bar, note
from .runs import Run, check_writable, checkpoint_path, read_checkpoint, write_checkpoint
from .splits import Splits, load_splits
from .strategies import Stage, param_groups, stages


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One logit with BCE for two classes, softmax cross-entropy for more."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    return F.cross_entropy(logits, y)


def run_epoch(model: Classifier, batches: Iterable, start: int, device: Device,
              optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
              desc: str = "", on_first_batch: Callable[[], None] | None = None
              ) -> tuple[float, float, torch.Tensor]:
    """One pass: trains when given an optimizer; returns (mean loss, accuracy, probabilities on the CPU).

    Sums stay on the device until the end, so a GPU is never made to wait for a batch's numbers; loss and
    accuracy are over every process's batches, the probabilities this process's.
    """
    training = optimizer is not None
    model.train(training)
    total, correct, count, probs = 0.0, 0, 0, []
    with torch.set_grad_enabled(training):
        for k, (x, y) in enumerate(bar(batches, desc, total=_len(batches))):
            if k == 0 and on_first_batch:
                on_first_batch()
            with device.autocast():
                logits = model(x, start)
            loss = loss_fn(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            p = probabilities(logits.detach())
            probs.append(p)
            total += loss.detach() * len(y)
            correct += (p.argmax(1) == y).sum()
            count += len(y)
    total, correct, count = distributed.all_sum(total, correct, count)
    return total / count, correct / count, torch.cat(probs).cpu()


def _len(batches: Iterable) -> int | None:
    return len(batches) if hasattr(batches, "__len__") else None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; the message says what was kept and how to continue."""


@dataclass
class Progress:
    """Where a run stands in its current stage. Checkpointed with its tensors after every epoch, it lets an
    interrupted run continue exactly: each epoch's randomness derives from (seed, epoch), so no RNG state
    needs saving."""

    stage: int = 0  # index into the plan
    epoch: int = 0  # epochs finished in this stage
    best_loss: float = math.inf
    best_epoch: int = 0
    waited: int = 0  # epochs since the validation loss last improved
    seconds: float = 0.0  # training time so far, across interruptions
    history: list[dict] = field(default_factory=list)
    model: dict[str, torch.Tensor] | None = None  # when resuming: the trained tensors as checkpointed
    best: dict[str, torch.Tensor] | None = None  # the trained tensors at best_epoch
    optimizer: dict[int, dict[str, torch.Tensor]] | None = None  # per-parameter optimizer state
    _tensor_fields = ("model", "best", "optimizer")

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._tensor_fields}

    def tensors(self, model: Classifier) -> dict[str, torch.Tensor]:
        """The trained tensors now and at the best epoch, and the optimizer state, flat for a safetensors file."""
        flat = {f"model.{k}": v for k, v in trained_state(model).items()}
        flat |= {f"best.{k}": v for k, v in (self.best or {}).items()}
        return flat | {f"optimizer.{i}.{k}": v for i, s in (self.optimizer or {}).items() for k, v in s.items()}

    @classmethod
    def restore(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> Progress:
        """The inverse of `to_json` and `tensors`."""
        parts: dict[str, dict] = {name: {} for name in cls._tensor_fields}
        for key, value in tensors.items():
            part, name = key.split(".", 1)
            if part == "optimizer":
                index, name = name.split(".", 1)
                parts[part].setdefault(int(index), {})[name] = value
            else:
                parts[part][name] = value
        return cls(**meta, **parts)


def trained_state(model: Classifier) -> dict[str, torch.Tensor]:
    """A copy of what training can change: the head and the blocks after the frozen prefix. Frozen blocks keep
    their weights and (in inference mode) their BatchNorm statistics, and the prefix only shrinks from stage to
    stage, so best-restore and checkpoints need no more; for feature extraction that is the head alone."""
    trained = [("head", model.head)] + [(f"blocks.{i}", model.blocks[i]) for i in range(model.frozen, model.num_blocks)]
    return {k: v.clone() for name, module in trained for k, v in module.state_dict(prefix=f"{name}.").items()}


@dataclass
class Hooks:
    """What a caller does around the loop, by name, so that the loop stays one loop for every caller."""

    first_batch: Callable[[], None] = lambda: None
    epoch_end: Callable[[Progress], None] = lambda progress: None


def fit(model: Classifier, stage: Stage, feed: Feed, config: TrainConfig, device: Device, progress: Progress,
        hooks: Hooks | None = None) -> None:
    """Train one stage from where `progress` stands, with early stopping on validation loss; restores the best
    weights. `hooks.epoch_end` gets the progress after every epoch, to checkpoint it."""
    hooks = hooks or Hooks()
    model.freeze(stage.frozen, config.bn_frozen)
    net = distributed.wrap(model)  # what trains: under torchrun, the trained part in DDP
    optimizer = torch.optim.AdamW(param_groups(model.blocks, model.head, stage, config.lr_decay))
    if progress.optimizer:
        optimizer.load_state_dict({"state": progress.optimizer, "param_groups": optimizer.state_dict()["param_groups"]})
    scaler = device.grad_scaler()
    history = progress.history
    while progress.epoch < stage.epochs and not (config.patience and progress.waited >= config.patience):
        torch.manual_seed(config.seed * 1000 + len(history) + 7919 * distributed.rank())  # dropout: per process
        began = time.perf_counter()
        label = f"stage {progress.stage + 1} ({stage.name}) epoch {progress.epoch + 1}/{stage.epochs}"
        train_loss, train_acc, _ = run_epoch(net, feed.train(progress.epoch), feed.start, device, optimizer, scaler,
                                             label, hooks.first_batch)
        val_loss, val_acc, _ = run_epoch(model, feed.val(), feed.start, device, desc="validating")
        row = {"epoch": len(history) + 1, "stage": progress.stage + 1, "trained": stage.name,
               "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
               "seconds": time.perf_counter() - began}
        history.append(row)
        note(f"{label}: loss {train_loss:.4f} acc {train_acc:.4f} | val loss {val_loss:.4f} "
             f"acc {val_acc:.4f} | {row['seconds']:.1f}s")
        progress.epoch += 1
        if val_loss < progress.best_loss:
            progress.best_loss, progress.best_epoch, progress.waited = val_loss, row["epoch"], 0
            progress.best = trained_state(model)
        else:
            progress.waited += 1
        progress.optimizer = optimizer.state_dict()["state"]
        hooks.epoch_end(progress)
    if not progress.best:
        raise TransferlabError("training diverged: the validation loss was never a finite number; try a lower --lr")
    model.load_state_dict(progress.best, strict=False)


# ---------------------------------------------------------------- a whole run


def train(config: TrainConfig, out: str | Path | None = None, splits: Splits | None = None,
          store: FeatureCache | None = None, overwrite: bool = False, progress: Progress | None = None,
          device: Device | None = None) -> Run:
    """Train with `config`'s strategy, evaluate on validation, and save a run directory to `out`.

    With `out`, every epoch is checkpointed beside it, so Ctrl-C or SIGTERM stops with an `Interrupted` that
    `resume(out)` continues from; `progress` is that continuation's starting point.
    """
    started = time.perf_counter()
    checkpoint = None if out is None else checkpoint_path(Path(out))
    if checkpoint and not progress:
        check_writable(Path(out), overwrite)
        if checkpoint.exists() and not overwrite:
            raise TransferlabError(f"{out} has an interrupted run: continue it with `transferlab train --resume {out}`"
                                   " or pass --overwrite to start again")
    device = device or devices.resolve(config)
    plan = stages(config.strategy, len(backbones.block_names(config.backbone)), config.unfreeze_blocks,
                  config.epochs, config.head_epochs, config.lr, config.backbone_lr)  # a wrong name fails here
    if splits is None:
        with distributed.main_first():  # the others then read the main process's scan record
            splits = load_splits(config)
    note(f"building {config.backbone} ({'random init' if config.weights == 'none' else config.weights + ' weights'})"
         f" on {device.summary()}")
    built = create_classifier(config, len(splits.classes), device.fold_bn)
    model = device.place(built.model)
    store = store or feature_store(config)
    features = Features(built, config, device, store) if config.cache else None
    if progress:
        model.load_state_dict(progress.model, strict=False)
    elif checkpoint:
        distributed.main_only(checkpoint.unlink)(missing_ok=True)  # an interrupted run that --overwrite replaces
    progress = progress or Progress()
    began = time.perf_counter() - progress.seconds
    meta = {"config": config.to_dict(), "overwrite": overwrite, "data": splits.fingerprint(),
            "processes": device.processes}

    @distributed.main_only
    def save_checkpoint(p: Progress) -> None:
        p.seconds = time.perf_counter() - began
        write_checkpoint(checkpoint, p.tensors(model), meta | {"progress": p.to_json()})

    waited = []

    def first_batch() -> None:
        if not waited:
            waited.append(time.perf_counter() - started)
            note(f"first training batch after {waited[0]:.1f}s")

    @distributed.main_only
    def save(run: Run) -> None:
        run.save(out, overwrite)
        checkpoint.unlink()

    hooks = Hooks(first_batch, save_checkpoint if checkpoint else lambda p: None)
    with _interruptible(checkpoint, out):
        if features:  # shallowest prefix first: deeper ones then start from its features, not from the images
            for frozen in sorted({s.frozen for s in plan[progress.stage:] if s.frozen > 0}):
                features.feed(splits, frozen)
        for stage in plan[progress.stage:]:
            feed = (features and features.feed(splits, stage.frozen)) or ImageFeed(splits, built.pre, config, device)
            fit(model, stage, feed, config, device, progress, hooks)
            best_epoch, history = progress.best_epoch, progress.history
            progress = Progress(progress.stage + 1, seconds=progress.seconds, history=history)
        seconds = time.perf_counter() - began
        _, _, probs = run_epoch(model, feed.val(), feed.start, device, desc="evaluating")
        probs = distributed.gather(probs, len(splits.val), config.seed)
        result = metrics.evaluate(probs.numpy(), np.array(splits.val.labels), splits.classes)
        info = {
            "classes": splits.classes,
            "backbone": {"name": config.backbone, "blocks": built.block_names, **built.weights,
                         "feature_shape": built.feature_shape},
            "preprocessing": asdict(built.pre),
            "stages": [asdict(s) for s in plan],
            "trainable_params": model.trainable_params(),
            "total_params": sum(p.numel() for p in model.parameters()),
            "best_epoch": best_epoch,
            "train_seconds": seconds,
            "first_batch_seconds": waited[0] if waited else None,
            "device": device.describe(),
            "cache": {"used": config.cache, "views": config.cache_views if config.augment != "none" else 1,
                      "augment": config.augment, "hits": store.hits, "misses": store.misses},
            "data": splits.summary(),
        }
        split = [{"split": name, "path": str(f), "label": s.classes[y]}
                 for name, s in (("train", splits.train), ("val", splits.val)) for f, y in zip(s.files, s.labels)]
        run = Run(config, info, model.eval(), history, result, split, val_probabilities=probs.numpy())
        if out is not None:
            save(run)
            distributed.barrier()  # so that every process returns a run that is on disk
            run.path = Path(out)
    return run


def resume(out: str | Path, store: FeatureCache | None = None, splits: Splits | None = None,
           device: Device | None = None) -> Run:
    """Continue an interrupted run from its last finished epoch; it ends as the uninterrupted run would have.
    `splits`: the images it began with, when they are not its config's own (a comparison's training subset)."""
    out = Path(out)
    path = checkpoint_path(out)
    if not path.is_file():
        done = (out / "config.json").is_file()
        raise TransferlabError(f"{out} finished training; there is nothing to resume" if done
                               else f"there is no interrupted run at {out} to resume")
    meta, tensors = read_checkpoint(path)
    processes = meta.get("processes", 1)
    if processes != distributed.world_size():
        how = "without torchrun" if processes == 1 else f"under torchrun with {processes} processes in all"
        raise TransferlabError(f"{out} was training in {processes} process(es) and continues only as it began: "
                               f"resume it {how}, or start again with --overwrite")
    config = TrainConfig.from_dict(meta["config"])
    device = device or devices.resolve(config)  # under torchrun, resolving joins the process group
    if splits is None:
        with distributed.main_first():
            splits = load_splits(config)
    if splits.fingerprint() != meta["data"]:
        raise TransferlabError(f"the images for {out} changed since it was interrupted, so it cannot continue as it "
                               "began; start again with --overwrite")
    return train(config, out, splits, store, meta["overwrite"], Progress.restore(meta["progress"], tensors), device)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside, SIGTERM (kill, a scheduler's time limit) raises KeyboardInterrupt as Ctrl-C does. Afterwards the
    handler before is back, unless something inside set another (a process that must ignore SIGTERM while it
    stops keeps ignoring it). Signal handlers can only be set from the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is signal.default_int_handler:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


@contextlib.contextmanager
def _interruptible(checkpoint: Path | None, out: str | Path | None) -> Iterator[None]:
    """Ctrl-C, or SIGTERM, stops training with an `Interrupted` that says whether and how the run can continue;
    so does another process of the run stopping, under torchrun, which then also sends SIGTERM to this process:
    the process ignores it, as it is stopping already, so that the message gets out."""
    try:
        with sigterm_interrupts(), distributed.watched():
            yield
    except (KeyboardInterrupt, distributed.ProcessLost) as e:
        if threading.current_thread() is threading.main_thread() and distributed.world_size() > 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # and so it stays: the process ends with the message
        if checkpoint is None:
            raise
        kept = (f"the finished epochs are saved: continue with `transferlab train --resume {out}`"
                if checkpoint.exists() else "no epoch had finished, so nothing was saved")
        raise Interrupted(f"{e if isinstance(e, distributed.ProcessLost) else 'interrupted'}; {kept}") from None
