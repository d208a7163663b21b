"""Classification metrics computed here (no scikit-learn): accuracy, balanced accuracy, macro one-vs-rest AUC,
confusion matrix."""
from __future__ import annotations

import torch


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, n_classes: int) -> torch.Tensor:
    """int64 ``[n_classes, n_classes]``: row = true class, column = predicted class (``labels``/``predicted``:
    integers ``[n]`` in ``[0, n_classes)``)."""
    for name, values in (("labels", labels), ("predicted", predicted)):
        if values.numel() and not 0 <= int(values.min()) <= int(values.max()) < n_classes:
            raise ValueError(f"{name} must lie in [0, {n_classes}), got values in [{int(values.min())}, "
                             f"{int(values.max())}]")
    flat = labels.long() * n_classes + predicted.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).view(n_classes, n_classes)


def binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` labels (Mann-Whitney U with tied ranks
    averaged); NaN when one of the two groups is empty."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    upper = torch.cumsum(counts, 0).double()
    average_rank = upper - (counts.double() - 1) / 2  # 1-based mean rank of each tied group
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(probabilities: torch.Tensor, labels: torch.Tensor) -> dict:
    """Metrics of ``probabilities [n, n_classes]`` against ``labels [n]``: accuracy, balanced accuracy (mean
    per-class recall over the classes present), macro AUC (mean one-vs-rest AUC over classes with both groups
    present) and the confusion matrix (a nested list)."""
    if probabilities.dim() != 2 or labels.dim() != 1 or labels.shape[0] != probabilities.shape[0]:
        raise ValueError(f"probabilities must be [n, n_classes] and labels [n], got {tuple(probabilities.shape)} and "
                         f"{tuple(labels.shape)}")
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(dim=1)
    matrix = confusion_matrix(labels, predicted, n_classes)
    support = matrix.sum(dim=1)
    present = support > 0
    recall = matrix.diag()[present].double() / support[present].double()
    aucs = [binary_auc(probabilities[:, c], labels == c) for c in range(n_classes)]
    aucs = [a for a in aucs if a == a]
    return {"accuracy": float((predicted == labels).double().mean()),
            "balanced_accuracy": float(recall.mean()),
            "macro_auc": float(sum(aucs) / len(aucs)) if aucs else float("nan"),
            "confusion_matrix": matrix.tolist(), "n": int(labels.numel())}
