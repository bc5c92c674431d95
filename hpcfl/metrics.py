"""Evaluation metrics, computed with scikit-learn (reference §8), and the per-client fairness summary."""

from __future__ import annotations

import warnings

import numpy as np
import torch

GAP_METRICS = ("bacc", "auc", "acc", "f1")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Metrics of one test set from softmax probabilities [n, C]:

    bacc: balanced accuracy · auc: macro one-vs-one AUC (Hand & Till; the paper's "AUC") · acc: accuracy ·
    f1: macro F1 · f1_weighted: support-weighted F1 · auc_weighted: support-weighted one-vs-rest AUC ·
    confusion: the C x C confusion matrix (rows: true class). AUCs are NaN when the test set lacks one of the
    model's classes (they are undefined then)."""
    with warnings.catch_warnings():
        # small held-out parts often lack a class: sklearn warns, the metric is still what we want
        warnings.simplefilter("ignore", UserWarning)
        return _metrics(np.asarray(y_true), probs)


def _metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    # imported here: scikit-learn costs half a second of start-up, and only ranks that evaluate need it
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 roc_auc_score)

    pred = probs.argmax(axis=1)
    labels = np.arange(probs.shape[1])
    out = {
        "bacc": float(balanced_accuracy_score(y_true, pred)),
        "auc": float("nan"),
        "acc": float(accuracy_score(y_true, pred)),
        "f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(y_true, pred, labels=labels, average="weighted", zero_division=0)),
        "auc_weighted": float("nan"),
    }
    if len(np.unique(y_true)) == probs.shape[1]:
        # float64 and renormalised: sklearn checks that every row sums to 1.
        p = probs.astype(np.float64)
        p /= p.sum(axis=1, keepdims=True)
        if probs.shape[1] == 2:  # binary: both averages are the one ROC AUC
            out["auc"] = out["auc_weighted"] = float(roc_auc_score(y_true, p[:, 1]))
        else:
            out["auc"] = float(roc_auc_score(y_true, p, multi_class="ovo", average="macro", labels=labels))
            out["auc_weighted"] = float(roc_auc_score(y_true, p, multi_class="ovr", average="weighted",
                                                      labels=labels))
    out["confusion"] = confusion_matrix(y_true, pred, labels=labels).tolist()
    return out


def gaps(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Clean minus corrupted, per corrupted test set and metric: the fairness gap of quality shift."""
    clean = results.get("clean")
    if clean is None:
        return {}
    return {name: {m: clean[m] - r[m] for m in GAP_METRICS} for name, r in results.items() if name != "clean"}


def client_summary(values: np.ndarray, corrupted: list[int]) -> dict[str, float]:
    """Worst client, spread across clients, and the clean-group vs corrupted-group means of one per-client metric."""
    values = np.asarray(values, dtype=np.float64)
    clean = [i for i in range(len(values)) if i not in set(corrupted)]
    return {
        "worst": float(values.min()), "std": float(values.std()), "mean": float(values.mean()),
        "clean_mean": float(values[clean].mean()) if clean else float("nan"),
        "corrupted_mean": float(values[corrupted].mean()) if corrupted else float("nan"),
    }


@torch.inference_mode()
def predict_proba(model: torch.nn.Module, images: torch.Tensor, transform, batch_size: int) -> np.ndarray:
    """Softmax probabilities of ``model`` (eval mode) over uint8 images [n, H, W, C]."""
    model.eval()
    out = []
    for a in range(0, images.shape[0], batch_size):
        logits = model(transform(images[a:a + batch_size]))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out).numpy()
