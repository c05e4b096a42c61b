"""ONNX files of a run: uint8 RGB images in, class probabilities out, normalisation inside; the classes, the
whole preprocessing and the run's card travel as metadata, so the file alone is enough to predict
(`transferlab.exported`). Every export checks itself: ONNX Runtime against PyTorch on one batch, as timm's
`onnx_export(check_forward=True)` does. `quantize="int8"` adds a copy quantized statically by ONNX Runtime,
calibrated on the run's own training images, and scores both on the run's validation images.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime import quantization
from torch import nn

from . import exported
from .errors import TransferlabError
from .model import Classifier
from .runs import Run, write_atomic
from .predict import probabilities

OPSET = 18
TOLERANCE = 1e-4  # largest difference in any probability between ONNX Runtime and PyTorch
CHECK_BATCH = 3  # images in the self-check; not the traced batch size, so a batch size baked in would show
CALIBRATION_IMAGES = 128
QUANTIZATIONS = ("int8",)


@dataclass
class Exported:
    """What `export` wrote and what its checks measured."""

    path: Path
    max_difference: float  # ONNX Runtime vs PyTorch, the largest probability difference on the check batch
    int8: Path | None = None
    calibration_images: int = 0
    accuracy: dict[str, float] | None = None  # validation accuracy of "fp32" and "int8", on `validation_images`
    validation_images: int = 0


class _Probabilities(nn.Module):
    """The run's classifier with its probabilities as the output (sigmoid for one logit, softmax for more)."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return probabilities(self.model(images))


def export(run: Run | str | Path, out: str | Path | None = None, quantize: str | None = None,
           overwrite: bool = False) -> Exported:
    """Write `run` (a Run or its directory) as ONNX to `out` (default RUN_DIR/model.onnx), plus
    `<out>.int8.onnx` with quantize="int8"."""
    if quantize not in (None, *QUANTIZATIONS):
        raise TransferlabError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    run_dir = run.path if isinstance(run, Run) else Path(run)
    if out is None and run_dir is None:
        raise TransferlabError("this run was not saved to a directory: give export an `out` file")
    out = Path(out) if out else run_dir / "model.onnx"
    int8 = out.with_name(out.name.removesuffix(".onnx") + ".int8.onnx") if quantize else None
    for path in filter(None, (out, int8)):
        _check_writable(path, overwrite)
    run = run if isinstance(run, Run) else Run.load(run)
    calibration = _calibration_files(run) if quantize else []
    model = _trace(run)
    difference = _check(model, run)
    write_atomic(out, model.SerializeToString())
    result = Exported(out, difference)
    if int8:
        _quantize(out, int8, calibration, run)
        result.int8, result.calibration_images = int8, len(calibration)
        result.accuracy, result.validation_images = _validation_accuracy(run, {"fp32": out, "int8": int8})
    return result


def _check_writable(path: Path, overwrite: bool) -> None:
    """Never replace a file that is not an earlier export, and an earlier export only when asked."""
    if not path.exists():
        return
    if not overwrite:
        raise TransferlabError(f"{path} already exists; pass --overwrite to replace it")
    try:
        ours = onnx.load_model(str(path), load_external_data=False).metadata_props
    except Exception:
        ours = []
    if not any(p.key == "format" and p.value == exported.FORMAT for p in ours):
        raise TransferlabError(f"{path} is not an ONNX file that transferlab exported; refusing to overwrite it")


@contextlib.contextmanager
def _plain(model: Classifier) -> Iterator[Classifier]:
    """The model in fp32 on the CPU, without BatchNorm folding (ONNX Runtime fuses BatchNorm itself); as it
    was afterwards."""
    device, folding, training = next(model.parameters()).device, model.folding, model.training
    model.folding = contextlib.nullcontext()
    try:
        yield model.eval().cpu()
    finally:
        model.folding = folding
        model.to(device).train(training)


def _trace(run: Run) -> onnx.ModelProto:
    """The run's model as ONNX with a dynamic batch, and its metadata."""
    size = run.preprocessing.size
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with _plain(run.model) as model, warnings.catch_warnings(), torch.no_grad():
        # TorchScript's exporter, as timm's onnx_export uses by default: 8x faster here than the torch.export one
        # (3 s against 25 s for MobileNetV2); its deprecation and tracer warnings do not concern a fixed-size model
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(_Probabilities(model), (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["images"], output_names=["probabilities"],
                              dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TransferlabError(f"cannot export backbone {run.config.backbone} to ONNX: {reason}") from None
    proto = onnx.load_model_from_string(buffer.getvalue())
    proto.producer_name, proto.doc_string = "transferlab", f"{run.config.strategy} on {run.config.backbone}"
    onnx.helper.set_model_props(proto, exported.metadata(run.classes, run.preprocessing, run.config.max_pixels,
                                                         run.card))
    onnx.checker.check_model(proto)
    return proto


def _check(proto: onnx.ModelProto, run: Run) -> float:
    """Largest probability difference between ONNX Runtime and PyTorch on one batch; an error beyond TOLERANCE
    or where a label differs."""
    size = run.preprocessing.size
    batch = torch.randint(0, 256, (CHECK_BATCH, 3, size, size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(1))
    with _plain(run.model) as model, torch.no_grad():
        expected = _Probabilities(model)(batch).numpy()
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": batch.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    if difference > TOLERANCE or (got.argmax(1) != expected.argmax(1)).any():
        raise TransferlabError(f"the exported model disagrees with PyTorch (probabilities differ by up to "
                               f"{difference:.2g}); it was not written")
    return difference


class _Calibration(quantization.CalibrationDataReader):
    """Images prepared as for prediction, one at a time (percentile calibration needs equal batches)."""

    def __init__(self, files: list[Path], run: Run):
        self.batches = exported.batches(files, run.preprocessing, run.config.max_pixels, errors={}, size=1)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


def _split_files(run: Run, split: str) -> list[tuple[Path, str]]:
    """(file, label) of the run's `split` whose files are still there."""
    return [(Path(r["path"]), r["label"]) for r in run.split if r["split"] == split and Path(r["path"]).is_file()]


def _calibration_files(run: Run) -> list[Path]:
    """Up to CALIBRATION_IMAGES of the run's training images, evenly spaced through the split (so every class
    is in)."""
    train = [f for f, _ in _split_files(run, "train")]
    if not train:
        raise TransferlabError("cannot calibrate int8: the run's training images are gone (split.csv in the run "
                               "directory lists them)")
    return train[:: max(1, len(train) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]


def _quantize(fp32: Path, int8: Path, calibration: list[Path], run: Run) -> None:
    """Static int8 by ONNX Runtime: QDQ, uint8 activations, per-channel int8 weights with a reduced range (AVX2
    without VNNI saturates the full one), activation ranges from the 99.999th percentile of `calibration` (on
    cats-vs-dogs, tf_efficientnet_lite0: the fp32 model's accuracy, where min-max ranges lost 0.5 to 1 point);
    the metadata of `fp32` carried over."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quantization.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress notes are not the user's business
            quantization.quantize_static(
                str(prepared), str(quantized), _Calibration(calibration, run),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True, reduce_range=True,
                calibrate_method=quantization.CalibrationMethod.Percentile,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8)
        try:  # ONNX Runtime has int8 kernels that refuse some shapes (1x1 feature maps of tf_efficientnet_lite0)
            ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"]).run(
                None, _Calibration(calibration[:2], run).get_next())
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TransferlabError(f"ONNX Runtime cannot run the int8 model ({reason}); {fp32} is written and "
                                   "works") from None
        proto = onnx.load_model(str(quantized))
    onnx.helper.set_model_props(proto, {p.key: p.value for p in onnx.load_model(str(fp32)).metadata_props}
                                | {"quantization": f"int8, static, calibrated on {len(calibration)} training images"})
    write_atomic(int8, proto.SerializeToString())


def _validation_accuracy(run: Run, models: dict[str, Path]) -> tuple[dict[str, float] | None, int]:
    """Accuracy of each exported file on the run's validation images that can still be read."""
    val = dict(_split_files(run, "val"))
    if not val:
        return None, 0
    accuracy, scored = {}, 0
    for name, path in models.items():
        rows = [r for r in exported.ExportedModel(path).predict(list(val)) if "error" not in r]
        accuracy[name], scored = float(np.mean([r["label"] == val[Path(r["path"])] for r in rows])), len(rows)
    return accuracy, scored
