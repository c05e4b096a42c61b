"""Evaluation numbers from class probabilities (scikit-learn), binary and multi-class alike."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def evaluate(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """accuracy, precision, recall, f1, roc_auc, log_loss, confusion_matrix.

    Binary: the positive class is the second one. Multi-class: macro averages, one-vs-rest ROC AUC.
    """
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    binary = len(classes) == 2
    average = "binary" if binary else "macro"
    present = len(np.unique(labels)) == len(classes)
    if binary:
        auc = skm.roc_auc_score(labels, probs[:, 1]) if present else None
    else:
        auc = skm.roc_auc_score(labels, probs, multi_class="ovr", labels=range(len(classes))) if present else None
    return {
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "precision": float(skm.precision_score(labels, pred, average=average, zero_division=0)),
        "recall": float(skm.recall_score(labels, pred, average=average, zero_division=0)),
        "f1": float(skm.f1_score(labels, pred, average=average, zero_division=0)),
        "roc_auc": None if auc is None else float(auc),
        "log_loss": float(skm.log_loss(labels, np.clip(probs, 1e-7, 1), labels=range(len(classes)))),
        "confusion_matrix": skm.confusion_matrix(labels, pred, labels=range(len(classes))).tolist(),
        "n_images": int(len(labels)),
        "classes": list(classes),
    }
