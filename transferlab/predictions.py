"""What `predict` answers for images, whichever engine gives the probabilities: a run's PyTorch model
(`Run.predict`) or an exported ONNX file (`ExportedModel.predict`). No torch here."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import images
from .errors import TransferlabError

if TYPE_CHECKING:
    from .exported import ExportedModel
    from .runs import Run


def load(source: str | Path) -> Run | ExportedModel:
    """The model at `source`: an exported .onnx file (ONNX Runtime; torch is not imported) or a run directory."""
    if Path(source).suffix.lower() == ".onnx" and not Path(source).is_dir():
        from .exported import ExportedModel

        return ExportedModel(source)
    from .runs import Run

    return Run.load(source)


def request(paths: str | Path | Iterable[str | Path], top_k: int | None, classes: list[str],
            errors: str) -> tuple[list[Path], int]:
    """(the image files that `paths` name, how many classes each row lists), or a one-line error.

    One path (str or Path) is one image or folder; `top_k` defaults to 3, or 1 for a two-class model, and is at
    most every class; `errors` is "row" (a row with the file's error) or "raise".
    """
    if errors not in ("row", "raise"):
        raise TransferlabError(f"errors must be 'row' or 'raise', got {errors!r}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    top_k = min(top_k or (3 if len(classes) > 2 else 1), len(classes))
    if top_k < 1:
        raise TransferlabError("--top-k must be a positive number")
    files = images.find(paths)
    if not files:
        raise TransferlabError(f"no images found in {', '.join(map(str, paths))}")
    return files, top_k


def rows(files: list[Path], unusable: dict[Path, str], probabilities: np.ndarray, classes: list[str], top_k: int,
         errors: str) -> list[dict]:
    """One row per file, in order: its label, probability and top-k classes, or the reason it is `unusable`
    (with errors="raise", the first such file stops the call). `probabilities` holds a row for each usable file."""
    if errors == "raise" and unusable:
        first = next(f for f in files if f in unusable)
        raise TransferlabError(f"{first}: {unusable[first]}")
    probs = iter(probabilities)
    out = []
    for f in files:
        if f in unusable:
            out.append({"path": str(f), "error": unusable[f]})
            continue
        p = next(probs)
        order = np.argsort(-p)[:top_k]
        out.append({"path": str(f), "label": classes[order[0]], "probability": float(p[order[0]]),
                    "top": [{"label": classes[i], "probability": float(p[i])} for i in order]})
    return out
