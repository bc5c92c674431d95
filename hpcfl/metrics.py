"""Evaluation metrics, computed with scikit-learn (reference §8)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """bacc: balanced accuracy; auc: macro one-vs-one AUC (Hand & Till); acc: accuracy; f1: macro F1.

    ``probs`` are softmax probabilities [n, C]. AUC is NaN when the test set has fewer than two classes or misses
    one of the model's classes (one-vs-one AUC is then undefined)."""
    y_true = np.asarray(y_true)
    pred = probs.argmax(axis=1)
    labels = np.arange(probs.shape[1])
    out = {
        "bacc": float(balanced_accuracy_score(y_true, pred)),
        "acc": float(accuracy_score(y_true, pred)),
        "f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
    }
    if len(np.unique(y_true)) == probs.shape[1]:
        # float64 and renormalised: sklearn checks that every row sums to 1.
        p = probs.astype(np.float64)
        out["auc"] = float(roc_auc_score(y_true, p / p.sum(axis=1, keepdims=True), multi_class="ovo",
                                         average="macro", labels=labels))
    else:
        out["auc"] = float("nan")
    return {k: out[k] for k in ("bacc", "auc", "acc", "f1")}


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: torch.Tensor, transform, batch_size: int) -> np.ndarray:
    """Softmax probabilities of ``model`` (eval mode) over uint8 images [n, H, W, C]."""
    model.eval()
    out = []
    for a in range(0, images.shape[0], batch_size):
        logits = model(transform(images[a:a + batch_size]))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).numpy()
