"""The `transferlab` command: argument parsing and messages only; the work is the Python API's."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from . import distributed
from .config import TrainConfig, UploadLimits
from .errors import TransferlabError
from .memory import reuse_freed_memory

HELP = {
    "val": "validation folder with the same class sub-folders (default: --val-split of --data)",
    "val_split": "fraction of --data held out for validation, stratified and seeded (default 0.2)",
    "backbone": "timm model name; see `transferlab backbones` (default tf_efficientnet_lite0)",
    "weights": "imagenet (default: found offline where `transferlab weights` says, else downloaded), none "
               "(random init), or a file: safetensors, PyTorch state dict, or Keras .h5 (VGG16/VGG19)",
    "strategy": "feature-extraction | partial | full | two-stage (default) | scratch",
    "unfreeze_blocks": "blocks trained by partial and two-stage, counted from the top, or 'all' (default 1)",
    "epochs": "maximum epochs (of each stage's second part for two-stage) (default 10)",
    "head_epochs": "two-stage: maximum head-only epochs before unfreezing (default: --epochs)",
    "patience": "stop after this many epochs without a lower validation loss; 0 = off (default 3)",
    "batch_size": "images per step; under torchrun per process, so a step takes N times as many (default 32)",
    "image_size": "input size in pixels (default: the backbone's pretrained size)",
    "augment": "training augmentation: none (default), light (flip), standard (flip, rotate 20, zoom 10%%, contrast 10%%)",
    "head": "gap (pool, dropout, linear; default) or flatten (dense 256, the VGG16 notebooks' head)",
    "dropout": "dropout before the head's last layer (default 0.2)",
    "lr": "learning rate of the new head (default 1e-3)",
    "backbone_lr": "learning rate of unfrozen pretrained blocks (default 3e-5; 1e-3 for scratch)",
    "lr_decay": "factor applied per block going down from the top, for discriminative rates (default 1)",
    "train_bn": "let BatchNorm statistics update in trained blocks (default: frozen, as in Keras' recipe)",
    "seed": "random seed for split, init, shuffling and augmentation (default 0)",
    "cache": "compute each frozen prefix once and train on cached features; with nothing frozen and no "
             "augmentation, decode the images once (default on)",
    "cache_views": "augmented views cached per training image when --augment is not none (default 2)",
    "cache_dir": "where cached features persist (default $TRANSFERLAB_CACHE or ~/.cache/transferlab/features)",
    "cache_ram_gb": "features beyond this many GiB are memory-mapped from --cache-dir; decoded images are kept "
                    "only within it (default 4)",
    "cache_max_gb": "keep --cache-dir under this many GiB by removing the least recently used features that no "
                    "running command uses (default 20)",
    "device": "auto (default: the first CUDA GPU, else MPS, else the CPU), cpu, mps, cuda or cuda:N",
    "amp": "autocast: bf16, fp16 (GPU) or off (default: what was measured fastest on the device: bf16 on CPUs "
           "with AVX-512 BF16 or AMX, else off)",
    "channels_last": "channels-last memory format (default: on for the CPU, off for GPUs)",
    "fold_bn": "fold inference-mode BatchNorm into the convolution before it, same results (default: on for the "
               "CPU, off for GPUs)",
    "gpu_decode": "decode JPEGs on the GPU with nvjpeg (default: on for CUDA)",
    "workers": "image decoding processes (default: 0 on two cores or fewer, else cores - 1, at most 4 on the "
               "CPU and 8 with a GPU)",
    "max_pixels": "images with more pixels are refused as decompression bombs (default 89,478,485)",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise TransferlabError(f"{message} (see `{self.prog} --help`)")


def _unfreeze(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (booleans that default on become --no-X); unset flags keep the defaults."""
    for f in fields(TrainConfig):
        if f.name == "data" or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(flag if not default else "--no-" + flag[2:], dest=f.name,
                                help=f"turn off: {HELP[f.name]}" if default else HELP[f.name],
                                action="store_false" if default else "store_true", default=argparse.SUPPRESS)
            continue
        if f.type == "bool | None":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=HELP[f.name],
                                default=argparse.SUPPRESS)
            continue
        kind = _unfreeze if f.name == "unfreeze_blocks" else {"int": int, "float": float}.get(
            f.type.split(" ")[0], str)
        parser.add_argument(flag, dest=f.name, type=kind, help=HELP[f.name], default=argparse.SUPPRESS)


def config_from(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


DATA_HELP = ("folder of class sub-folders, a dataset root holding train/ and validation/ (or val/, valid/; "
             "test/ is used too), or a dataset name (cats-vs-dogs)")


def build_parser() -> Parser:
    parser = Parser(prog="transferlab", description="Transfer learning on folders of labelled images.")
    parser.add_argument("--version", action="version", version=f"transferlab {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train a classifier and save a run directory")
    train.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    add_config_flags(train)
    train.add_argument("--out", help="run directory to create")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run with the options it began with")

    evaluate = commands.add_parser("evaluate", help="metrics of a saved run on a labelled folder")
    evaluate.add_argument("run_dir", help="a run directory written by `transferlab train`")
    evaluate.add_argument("--data", required=True, help="labelled folder with the run's class sub-folders")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    predict = commands.add_parser("predict", help="label new images with a saved run or an exported ONNX file")
    predict.add_argument("model", metavar="RUN_DIR|MODEL.onnx",
                         help="a run directory written by `transferlab train`, or an ONNX file written by "
                              "`transferlab export` (then torch is not needed)")
    predict.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR", help="images, or folders searched for images")
    predict.add_argument("--top-k", type=int, help="classes listed per image, most likely first (default: 3 for "
                                                   "multi-class models, 1 for two classes; at most all classes)")
    fmt = predict.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    fmt.add_argument("--csv", action="store_true", help="print CSV: path, label, probability, error")

    data_cmd = commands.add_parser("data", help="inspect or download datasets")
    data_sub = data_cmd.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    check = data_sub.add_parser("check", help="classes, counts, and the files that would be skipped and why")
    check.add_argument("folder", help=DATA_HELP)
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--max-pixels", type=int, default=TrainConfig.max_pixels, help=HELP["max_pixels"])
    download = data_sub.add_parser("download", help="fetch a named dataset (needs the network)")
    download.add_argument("name", help="cats-vs-dogs")

    compare = commands.add_parser(
        "compare", help="train several strategies, depths, training sizes or seeds on the same data and report what "
        "the difference is worth")
    compare.add_argument("--data", default=argparse.SUPPRESS, help=DATA_HELP)
    compare.add_argument("--strategies", help="comma-separated, e.g. feature-extraction,partial,full,two-stage,scratch "
                                              "(default with --unfreeze-blocks: partial)")
    compare.add_argument("--unfreeze-blocks", dest="depths", metavar="N,...",
                         help="depths to sweep for partial and two-stage: blocks trained from the top, e.g. 0,1,2,3,all "
                              "(0 = feature extraction; partial at all = full); one value sets the depth (default 1)")
    compare.add_argument("--train-sizes", metavar="N,...",
                         help="learning curve: training images per class (50,100,all) or fractions of each class "
                              "(0.1,0.5,all), nested and class-balanced")
    compare.add_argument("--seeds", metavar="S,...",
                         help="repeat every configuration with these seeds (initialisation, order, augmentation); the "
                              "split stays --seed's")
    compare.add_argument("--test", help="held-out labelled folder that every point is also scored on")
    add_config_flags(compare, skip=("strategy", "unfreeze_blocks"))
    compare.add_argument("--out", help="folder for the runs, comparison.json/csv, plots and report")
    compare.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    compare.add_argument("--resume", metavar="OUT", help="finish an interrupted comparison with the options it began "
                                                         "with")

    export = commands.add_parser("export", help="write a run as an ONNX file that predicts on its own")
    export.add_argument("run_dir", help="a run directory written by `transferlab train`")
    export.add_argument("--format", choices=("onnx",), default="onnx", help="file format (default onnx)")
    export.add_argument("--out", metavar="FILE", help="where to write it (default RUN_DIR/model.onnx)")
    export.add_argument("--quantize", metavar="int8",
                        help="also write an int8 copy beside it (FILE.int8.onnx), calibrated on the run's training "
                             "images, and print both files' accuracy on its validation images")
    export.add_argument("--overwrite", action="store_true", help="replace files an earlier export wrote")

    serve = commands.add_parser("serve", help="a local web page and JSON API to try a model on your own photos")
    serve.add_argument("model", metavar="RUN_DIR|MODEL.onnx",
                       help="a run directory (Grad-CAM shown) or an ONNX file from `transferlab export`")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                            "network)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    limits = UploadLimits()
    serve.add_argument("--max-file-mb", type=float, default=limits.file_mb,
                       help=f"largest image accepted, in MB (default {limits.file_mb:g})")
    serve.add_argument("--max-request-mb", type=float, default=limits.request_mb,
                       help=f"largest request accepted, in MB (default {limits.request_mb:g})")
    serve.add_argument("--max-files", type=int, default=limits.files,
                       help=f"most images in one request (default {limits.files})")

    listing = commands.add_parser("backbones", help="backbones, their blocks, and offline weight availability")
    listing.add_argument("--json", action="store_true", help="print a JSON list")

    weights = commands.add_parser("weights", help="where each backbone's ImageNet weights come from on this machine")
    weights.add_argument("--json", action="store_true", help="print a JSON list")
    weights_sub = weights.add_subparsers(dest="weights_command", parser_class=Parser)
    fetch = weights_sub.add_parser("download", help="fetch ImageNet weights now, to train offline later")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="backbone names, e.g. vgg16 resnet50")

    features = commands.add_parser("cache", help="the feature cache: size by backbone and dataset, last use")
    features.add_argument("--cache-dir", help=HELP["cache_dir"])
    features.add_argument("--json", action="store_true", help="print a JSON list of entries")
    cache_sub = features.add_subparsers(dest="cache_command", parser_class=Parser)
    clear = cache_sub.add_parser("clear", help="remove cached features that no running command uses")
    clear.add_argument("--older-than", type=float, metavar="DAYS", help="only those last used more than DAYS ago")
    clear.add_argument("--cache-dir", help=HELP["cache_dir"], default=argparse.SUPPRESS)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from .training import resume, train

    given = {f.name for f in fields(TrainConfig)} & set(vars(args))  # flags not given are suppressed
    if args.resume:
        if given or args.out or args.overwrite:
            raise TransferlabError("--resume continues a run with the options it began with; give it no others")
        run = resume(args.resume)
    elif "data" not in given or not args.out:
        raise TransferlabError("train needs --data and --out (or --resume RUN_DIR)")
    else:
        run = train(config_from(args), args.out, overwrite=args.overwrite)
    m = run.metrics
    print(f"{run.config.strategy} on {run.config.backbone}: val accuracy {m['accuracy']:.4f}, f1 {m['f1']:.4f}, "
          f"loss {m['log_loss']:.4f} (best epoch {run.info['best_epoch']}, {run.info['train_seconds']:.1f}s) -> {run.path}")
    found, listed = run.info["data"], f"all listed in {run.path / 'config.json'}"
    if skipped := found["skipped"]:
        print(f"transferlab: warning: skipped {len(skipped)} unusable file(s), e.g. {skipped[0]['path']}: "
              f"{skipped[0]['reason']} ({listed})", file=sys.stderr)
    if duplicates := found["duplicates"]:
        print(f"transferlab: warning: {len(duplicates)} image(s) are byte-identical across splits, which inflates "
              f"validation scores, e.g. {duplicates[0]['a']} = {duplicates[0]['b']} ({listed})", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    from .runs import Run

    result = Run.load(args.run_dir).evaluate(args.data)
    if args.json:
        print(json.dumps(result))
        return 0
    for key in ("n_images", "accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"):
        value = result[key]
        print(f"{key:>10}: {value:.4f}" if isinstance(value, float) else f"{key:>10}: {value}")
    print(f"{'confusion':>10}: {result['confusion_matrix']} (rows true {', '.join(result['classes'])})")
    for s in result["skipped"]:
        print(f"   skipped: {s['path']}: {s['reason']}")
    return 0


def cmd_predict(args) -> int:
    from .predictions import load

    rows = load(args.model).predict(args.paths, args.top_k)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "label", "probability", "error"])
        writer.writerows([r["path"], r.get("label", ""), r.get("probability", ""), r.get("error", "")] for r in rows)
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['path']}\terror: {r['error']}")
            else:
                others = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"][1:])
                print(f"{r['path']}\t{r['label']}\t{r['probability']:.4f}\t{others}".rstrip())
    return 0 if any("error" not in r for r in rows) else 1


def cmd_data(args) -> int:
    from . import cache, data

    if args.data_command == "download":
        print(f"downloaded to {data.download(args.name)}")
        return 0
    layout = data.resolve(args.folder)
    found, classes = {}, None
    for name, folder in layout.splits.items():
        found[name] = data.scan(folder, classes, args.max_pixels, record=cache.scan_record(folder))
        classes = found[name].classes  # every split is read against the training classes
    if args.json:
        summaries = {name: images.summary() for name, images in found.items()}
        print(json.dumps(summaries["train"] if len(found) == 1 else {"splits": summaries}))
    else:
        for name, images in found.items():
            counts = images.counts()
            print(("" if len(found) == 1 else f"{name} ({layout.splits[name]}): ")
                  + f"{len(images)} usable images in {len(images.classes)} classes: "
                  + ", ".join(f"{c} {n}" for c, n in counts.items()))
            for s in images.skipped:
                print(f"skipped {s.path}: {s.reason}")
    empty = [f"{name}/{c}" if len(found) > 1 else c
             for name, images in found.items() for c, n in images.counts().items() if n == 0]
    if empty:
        print(f"transferlab: warning: no usable images for class(es) {', '.join(empty)}: a run cannot train on this",
              file=sys.stderr)
    return 1 if empty else 0


def cmd_backbones(args) -> int:
    from .backbones import LISTED, describe

    rows = [describe(name) for name in LISTED]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<24}{'params':>8}  imagenet offline  blocks (input first)")
    for r in rows:
        print(f"{r['name']:<24}{r['params'] / 1e6:>7.1f}M  {'yes' if r['imagenet_offline'] else 'no':<17} "
              + f"{len(r['blocks'])}: " + " ".join(r["blocks"]))
    return 0


def cmd_weights(args) -> int:
    from . import weights
    from .backbones import LISTED

    if args.weights_command == "download":
        for name in args.names:
            there = weights.download(name)
            print(f"{name}: {there.where}: {there.path}")
        return 0
    rows = []
    for name in LISTED:
        places = weights.found(name)
        usable = next((f for f in places if not f.unusable), None)
        rows.append({"name": name, "source": usable.where if usable else None, "file": usable and str(usable.path),
                     "unusable": [{"file": str(f.path), "reason": f.unusable} for f in places if f.unusable]})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'backbone':<24}{'imagenet weights from':<24}file")
    for r in rows:
        print(f"{r['name']:<24}{r['source'] or 'needs the network':<24}{r['file'] or ''}".rstrip())
        for u in r["unusable"]:
            print(f"{'':<24}not used: {u['file']}: {u['reason']}")
    return 0


def cmd_cache(args) -> int:
    from . import cache

    directory = Path(args.cache_dir) if args.cache_dir else cache.default_dir()
    if args.cache_command == "clear":
        if args.older_than is not None and args.older_than < 0:
            raise TransferlabError("--older-than must be 0 days or more")
        removed, busy = cache.clear(directory, args.older_than)
        print(f"removed {len(removed)} entries ({_size(sum(e.bytes for e in removed))}) from {directory}"
              + (f"; kept {len(busy)} that a running command uses" if busy else ""))
        return 0
    exists = directory.is_dir()
    listed = cache.entries(directory) if exists else []
    if args.json:
        print(json.dumps([asdict(e) for e in listed]))
        return 0
    print(f"{directory}: {_size(sum(e.bytes for e in listed))} in {len(listed)} entries; training keeps it under "
          f"--cache-max-gb (default {TrainConfig.cache_max_gb:g} GiB)")
    if partial := exists and cache.partial_bytes(directory):
        print(f"and {_size(partial)} being written, or left by killed runs (`transferlab cache clear` removes those)")
    groups: dict[tuple, list] = {}
    for e in listed:
        groups.setdefault((e.about.get("backbone", "?"), e.about.get("dataset", "? (from an older transferlab)")),
                          []).append(e)
    for (backbone, dataset), group in sorted(groups.items()):
        print(f"\n{backbone}  {dataset}: {_size(sum(e.bytes for e in group))} in {len(group)} entries")
        for e in sorted(group, key=lambda e: -e.last_used):
            what = f"block {e.about['block']}, {e.about['shape'][0]} images" if "block" in e.about else e.name
            if e.about.get("augment", "none") != "none":
                what += f", {e.about['augment']} view {e.about['view']}"
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            print(f"  {what:<44}{_size(e.bytes):>10}  last used {used}")
    return 0


def _size(n: int) -> str:
    """Binary units, as --cache-ram-gb and --cache-max-gb count."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def cmd_compare(args) -> int:
    from . import studies
    from .comparison import format_table
    from .report import View, recommendation_notes, summary_table, write

    given = {f.name for f in fields(TrainConfig)} & set(vars(args))  # flags not given are suppressed
    sweep_flags = [args.strategies, args.depths, args.train_sizes, args.seeds, args.test]
    if args.resume:
        if given or any(sweep_flags) or args.out or args.overwrite:
            raise TransferlabError("--resume continues a comparison with the options it began with; give it no others")
        result = studies.resume(args.resume, finish=write)
    elif "data" not in given or not args.out:
        raise TransferlabError("compare needs --data and --out (or --resume OUT)")
    else:
        sweep = studies.sweep(args.strategies, args.depths, args.train_sizes, args.seeds)
        result = studies.run(config_from(args), sweep, args.out, args.test, args.overwrite, finish=write)
    view = View.of(result)
    print(format_table(summary_table(view)))
    print(recommendation_notes(view)[0])
    for failure in result.failures:
        print(f"transferlab: warning: {failure.name} failed: {failure.error}", file=sys.stderr)
    print(f"report: {result.out / 'report.html'}")
    return 0


def cmd_export(args) -> int:
    from .export import export

    done = export(args.run_dir, args.out, args.quantize, args.overwrite)
    print(f"wrote {done.path} ({done.path.stat().st_size / 2**20:.1f} MB): ONNX Runtime gives PyTorch's "
          f"probabilities within {done.max_difference:.1g}")
    if done.int8:
        print(f"wrote {done.int8} ({done.int8.stat().st_size / 2**20:.1f} MB): int8, calibrated on "
              f"{done.calibration_images} training images")
        if done.accuracy:
            print(f"validation accuracy on {done.validation_images} images: int8 {done.accuracy['int8']:.4f}, "
                  f"fp32 {done.accuracy['fp32']:.4f} ({100 * (done.accuracy['int8'] - done.accuracy['fp32']):+.2f} pt)")
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    if min(args.max_file_mb, args.max_request_mb, args.max_files) <= 0:
        raise TransferlabError("--max-file-mb, --max-request-mb and --max-files must be positive")
    serve(args.model, args.host, args.port, UploadLimits(args.max_file_mb, args.max_request_mb, args.max_files))
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "data": cmd_data,
            "backbones": cmd_backbones, "compare": cmd_compare, "export": cmd_export, "serve": cmd_serve,
            "weights": cmd_weights, "cache": cmd_cache}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        reuse_freed_memory()
        with distributed.only_main_prints():
            return COMMANDS[args.command](args)
    except TransferlabError as e:
        _say(f"error: {e}", e)
        return 2
    except OSError as e:  # a permission or a full disk: the system's words suffice
        _say(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", e)
        return 1
    except ModuleNotFoundError as e:  # an optional dependency: export and serve need the `deploy` extra
        print(f"transferlab: error: {e.name} is not installed (`pip install 'transferlab[deploy]'` installs what "
              f"export and serve need)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # training's says how to continue; a bare Ctrl-C has no words
        _say(str(e) or "interrupted", e)
        return 130


def _say(message: str, error: BaseException) -> None:
    """The one line a failed command ends with. Under torchrun the main process says it; another process only
    of an error of its own after the processes met (before, they all meet the same mistakes), never of one
    that a process stopping caused or of Ctrl-C, which reaches every process."""
    if distributed.is_main():
        print(f"transferlab: {message}", file=sys.stderr)
    elif distributed.started() and not isinstance(error, (distributed.ProcessLost, KeyboardInterrupt)):
        print(f"transferlab: process {distributed.rank()}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
