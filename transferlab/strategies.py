"""Every strategy is which blocks train, at which learning rate, in one or two stages.

Defaults (measured on cats-vs-dogs with tf_efficientnet_lite0, see the README): the new head learns at
1e-3; pretrained blocks at 3e-5, small enough not to wreck ImageNet features; from scratch everything
learns at 1e-3. `lr_decay` < 1 gives each earlier trained block a further factor (discriminative rates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import TransferlabError

if TYPE_CHECKING:
    from torch import nn

STRATEGIES = ("feature-extraction", "partial", "full", "two-stage", "scratch")
HEAD_LR = 1e-3
BACKBONE_LR = 3e-5
SCRATCH_LR = 1e-3


@dataclass(frozen=True)
class Stage:
    """One training phase: blocks[:frozen] are frozen; the rest and the head train."""

    name: str
    frozen: int
    epochs: int
    head_lr: float
    backbone_lr: float


def stages(strategy: str, num_blocks: int, unfreeze: int | None, epochs: int, head_epochs: int | None,
           head_lr: float | None = None, backbone_lr: float | None = None) -> list[Stage]:
    """The table from DESIGN.md as code. `unfreeze` None means all blocks (for two-stage)."""
    if strategy not in STRATEGIES:
        raise TransferlabError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if epochs < 1:
        raise TransferlabError(f"--epochs must be a positive number, got {epochs}")
    n = num_blocks if unfreeze is None else unfreeze
    if not 1 <= n <= num_blocks:
        raise TransferlabError(f"--unfreeze-blocks must be between 1 and {num_blocks} (this backbone's blocks), got {n}")
    head_lr = head_lr or HEAD_LR
    backbone_lr = backbone_lr or (SCRATCH_LR if strategy == "scratch" else BACKBONE_LR)
    if strategy == "feature-extraction":
        return [Stage("head", num_blocks, epochs, head_lr, 0.0)]
    if strategy == "partial":
        return [Stage(f"last {n}", num_blocks - n, epochs, head_lr, backbone_lr)]
    if strategy in ("full", "scratch"):
        return [Stage("all", 0, epochs, head_lr, backbone_lr)]
    return [
        Stage("head", num_blocks, head_epochs or epochs, head_lr, 0.0),
        Stage(f"last {n}" if n < num_blocks else "all", num_blocks - n, epochs, backbone_lr, backbone_lr),
    ]


def param_groups(blocks: nn.ModuleList, head: nn.Module, stage: Stage, lr_decay: float = 1.0) -> list[dict]:
    """AdamW groups: the head at head_lr; trained block i at backbone_lr * lr_decay**(distance from the top)."""
    last = len(blocks) - 1
    groups = [{"params": list(head.parameters()), "lr": stage.head_lr}]
    for i in range(stage.frozen, len(blocks)):
        params = [p for p in blocks[i].parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": stage.backbone_lr * lr_decay ** (last - i)})
    return groups
