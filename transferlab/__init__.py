"""transferlab: transfer learning on image folders.

    import transferlab as tl
    run = tl.train("photos/", backbone="tf_efficientnet_lite0", strategy="two-stage", out="runs/first")
    run.predict(["new.jpg"])
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .config import TrainConfig
from .errors import TransferlabError
from .memory import reuse_freed_memory

if TYPE_CHECKING:
    from .compare import Comparison
    from .runs import Run

__all__ = ["TrainConfig", "TransferlabError", "Run", "train", "resume", "load", "compare"]


def __getattr__(name: str):
    """`Run` on first use: it imports torch, which `transferlab.exported` and the command line may not need."""
    if name == "Run":
        from .runs import Run

        return Run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule `transferlab.compare` (lazily, so possibly after this) must not replace the
    function `transferlab.compare` as the package's attribute."""

    def __setattr__(self, name: str, value) -> None:
        if not (name == "compare" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
    from .runs import Run

    return Run.load(path)


def compare(data: str | Path, strategies: Sequence[str], out: str | Path, test: str | Path | None = None,
            overwrite: bool = False, **options) -> Comparison:
    """Train each strategy on `data` and write the comparison and its report to `out`; options are
    TrainConfig fields (except strategy)."""
    from .compare import compare as _compare

    return _compare(data, strategies, out, test, overwrite, **options)
