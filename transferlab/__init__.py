"""transferlab: transfer learning on image folders.

    import transferlab as tl
    run = tl.train("photos/", backbone="tf_efficientnet_lite0", strategy="two-stage", out="runs/first")
    run.predict(["new.jpg"])
"""

from collections.abc import Sequence
from pathlib import Path

from .compare import Comparison
from .config import TrainConfig
from .errors import TransferlabError
from .memory import reuse_freed_memory
from .runs import Run

__all__ = ["TrainConfig", "TransferlabError", "Run", "train", "resume", "load", "compare"]


def train(data: str | Path, out: str | Path | None = None, overwrite: bool = False, **options) -> Run:
    """Train on a folder of class sub-folders (or a named dataset); options are TrainConfig fields."""
    from .training import train as _train

    reuse_freed_memory()
    return _train(TrainConfig(data=str(data), **options), out, overwrite=overwrite)


def resume(out: str | Path) -> Run:
    """Continue a run that Ctrl-C or SIGTERM interrupted; it ends as the uninterrupted run would have."""
    from .training import resume as _resume

    reuse_freed_memory()
    return _resume(out)


def load(path: str | Path) -> Run:
    """A saved run, ready to `evaluate(folder)` and `predict(paths)`."""
    return Run.load(path)


def compare(data: str | Path, strategies: Sequence[str] | str | None = None, out: str | Path | None = None,
            **options) -> Comparison:
    """Train each strategy on `data` and write the comparison and its report to `out`.

    options: TrainConfig fields (except strategy); the sweep's axes `unfreeze_blocks` (0 = feature extraction ..
    "all"), `train_sizes` (images per class, fractions or "all") and `seeds`, each a list or a comma-separated
    string; `test` (a labelled folder every point is also scored on); `overwrite`; `resume` (finish an interrupted
    comparison begun with the same arguments).
    """
    from . import studies
    from .report import write

    reuse_freed_memory()
    return studies.compare(data, strategies, out, finish=write, **options)
