"""transferlab: transfer learning on image folders.

    import transferlab as tl
    run = tl.train("photos/", out="runs/first")
    run.predict("new.jpg")

Importing the package is light: torch, timm and the rest load when a function first needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import TrainConfig
from .errors import TransferlabError

if TYPE_CHECKING:
    from .comparison import Comparison
    from .runs import Run

__all__ = ["TrainConfig", "TransferlabError", "Run", "Comparison", "train", "resume", "load", "compare"]


def train(data: str | Path, out: str | Path | None = None, overwrite: bool = False, **options) -> Run:
    """Train on a folder of class sub-folders (or a named dataset); options are TrainConfig fields."""
    from .memory import reuse_freed_memory
    from .training import train as _train

    config = TrainConfig.from_options(data, **options)
    reuse_freed_memory()
    return _train(config, out, overwrite=overwrite)


def resume(out: str | Path) -> Run:
    """Continue a run that Ctrl-C or SIGTERM interrupted; it ends as the uninterrupted run would have."""
    from .memory import reuse_freed_memory
    from .training import resume as _resume

    reuse_freed_memory()
    return _resume(out)


def load(path: str | Path) -> Run:
    """A saved run, ready to `evaluate(folder)` and `predict(paths)`."""
    from .runs import Run

    return Run.load(path)


def compare(data: str | Path, strategies: str | Sequence[str] | None = None, out: str | Path | None = None,
            **options) -> Comparison:
    """Train each strategy (a list, or names separated by commas) on `data` and write the comparison and its report
    to `out`.

    options: TrainConfig fields (except strategy); the sweep's axes `unfreeze_blocks` (0 = feature extraction ..
    "all"), `train_sizes` (images per class, fractions or "all") and `seeds`, each a list or a comma-separated
    string; `test` (a labelled folder every point is also scored on); `overwrite`; `resume` (finish an interrupted
    comparison begun with the same arguments).
    """
    from . import studies
    from .memory import reuse_freed_memory
    from .report import write

    reuse_freed_memory()
    return studies.compare(data, strategies, out, finish=write, **options)


def __getattr__(name: str):
    """`transferlab.Run`, `transferlab.Comparison` and `__version__`, looked up when first asked for."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("transferlab")
        except PackageNotFoundError:  # a source tree that was never installed
            return "unknown"
    if name == "Run":
        from .runs import Run

        return Run
    if name == "Comparison":
        from .comparison import Comparison

        return Comparison
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")

