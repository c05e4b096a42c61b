"""An exported ONNX file used on its own: ONNX Runtime, NumPy and Pillow, no torch, so that a deployment
needs only `pip install onnxruntime numpy pillow` (and transferlab itself, installed with `--no-deps`).

The file carries what prediction needs in its metadata (`metadata`): the classes, the preprocessing, the
decompression-bomb limit and the run's card. Images go in as uint8 RGB [batch, 3, size, size], prepared by
`images.prepare` as the run's own data pipeline prepares them; the model normalises them itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import images, predictions
from .errors import TransferlabError
from .images import Preprocessing

FORMAT = "transferlab-onnx/1"
BATCH = 32
STEPS = ("decode the file to RGB with its EXIF orientation applied; resize its short side to `resize` pixels "
         "(antialiased, `interpolation`); crop the centre `size` x `size`; feed uint8 [batch, 3, size, size]; "
         "the model swaps RGB to BGR itself where `channels` says BGR, and normalises with `mean` and `std`")


def metadata(classes: list[str], pre: Preprocessing, max_pixels: int, card: dict) -> dict[str, str]:
    """The ONNX metadata that makes a file usable alone."""
    return {"format": FORMAT, "classes": json.dumps(classes),
            "preprocessing": json.dumps(asdict(pre) | {"steps": STEPS}), "max_pixels": str(max_pixels),
            "card": json.dumps(card)}


def batches(files: list[Path], pre: Preprocessing, max_pixels: int, errors: dict[Path, str],
            size: int = BATCH) -> Iterator[np.ndarray]:
    """uint8 batches of the files that decode, in order; the reasons of those that do not go into `errors`."""
    for start in range(0, len(files), size):
        batch = []
        for f in files[start:start + size]:
            try:
                batch.append(images.prepare(images.load_image(f, max_pixels, draft=pre.resize), pre))
            except images.BadImage as e:
                errors[f] = str(e)
        if batch:
            yield np.stack(batch)


class ExportedModel:
    """An ONNX file written by `transferlab export`, run by ONNX Runtime on the CPU."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TransferlabError(f"model file not found: {self.path}")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TransferlabError(f"{self.path} is not a readable ONNX model ({reason})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise TransferlabError(f"{self.path} was not exported by transferlab, so its classes and preprocessing "
                                   "are unknown; export a run with `transferlab export RUN_DIR`")
        self.classes: list[str] = json.loads(meta["classes"])
        self.preprocessing = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
        self.max_pixels = int(meta["max_pixels"])
        self.card: dict = json.loads(meta["card"]) | {"quantization": meta.get("quantization", "none (fp32)")}

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """[N, classes] probabilities for uint8 images [N, 3, size, size]."""
        return self.session.run(None, {"images": batch})[0]

    def predict(self, paths: str | Path | Iterable[str | Path], top_k: int | None = None,
                errors: str = "row") -> list[dict]:
        """What `Run.predict` answers for the same images: label and probability per image, for one image or
        folder or several, with the `top_k` most likely classes; a file that cannot be used gets a row with its
        `error`, or with errors="raise" stops the call."""
        files, top_k = predictions.request(paths, top_k, self.classes, errors)
        unusable = {}
        probs = [self.probabilities(b) for b in batches(files, self.preprocessing, self.max_pixels, unusable)]
        return predictions.rows(files, unusable, np.concatenate(probs) if probs else [], self.classes, top_k, errors)
