"""From a model's logits to class probabilities, batch by batch: what evaluation, prediction, the report and the
server share, without any of the training loop."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from .devices import Device
from .model import Classifier
from .progress import bar


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """[N, classes] probabilities in fp32 whether the head has one logit (binary) or one per class."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], 1)
    return logits.softmax(1)


def predict(model: Classifier, batches: Iterable, device: Device, start: int = 0, desc: str = "predicting"
            ) -> np.ndarray:
    """[images, classes] probabilities for batches (x, ...) already on `device` that enter at block `start`."""
    model.eval()
    out = []
    with torch.no_grad():
        for x, *_ in bar(batches, desc):
            with device.autocast():
                out.append(probabilities(model(x, start)).cpu())
    return torch.cat(out).numpy()
