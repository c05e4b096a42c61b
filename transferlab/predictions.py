"""What `predict` answers for a list of image files, whichever engine gives the probabilities: a run's PyTorch
model (`Run.predict`) or an exported ONNX file (`ExportedModel.predict`). No torch here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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


def rows(files: list[Path], errors: dict[Path, str], probabilities: np.ndarray, classes: list[str],
         top_k: int) -> list[dict]:
    """One row per file, in order: its label, probability and top-k classes, or its `error`.

    `probabilities` holds a row for each file without an error, in the same order.
    """
    probs = iter(probabilities)
    out = []
    for f in files:
        if f in errors:
            out.append({"path": str(f), "error": errors[f]})
            continue
        p = next(probs)
        order = np.argsort(-p)[: min(top_k, len(classes))]
        out.append({"path": str(f), "label": classes[order[0]], "probability": float(p[order[0]]),
                    "top": [{"label": classes[i], "probability": float(p[i])} for i in order]})
    return out
