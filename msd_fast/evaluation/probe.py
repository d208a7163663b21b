"""Frozen-feature evaluation: a k-NN classifier (cosine similarity of centred features, DINO's
temperature-weighted vote, ``k`` scaled with the number of labels) and a linear probe (multinomial logistic
regression, full-batch L-BFGS on standardised features)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def default_k(n_labelled: int) -> int:
    """Neighbours for ``n_labelled`` training images: ``round(sqrt(n))`` clipped to [1, 20] (20 is DINO's k at
    ImageNet scale; with 3-4 labels per class, 20 neighbours would outvote the nearest ones)."""
    return max(1, min(20, round(math.sqrt(n_labelled))))


def knn_probabilities(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                      n_classes: int, *, k: Optional[int] = None, temperature: float = 0.07,
                      center: bool = True) -> torch.Tensor:
    """``[n_test, n_classes]`` class scores (summing to 1) from the ``k`` (default :func:`default_k`) most
    cosine-similar training features, each voting with weight ``exp(similarity / temperature)`` (as DINO's k-NN
    evaluation). ``center``: subtract the training features' mean first (a common offset otherwise dominates the
    cosine of small models' features)."""
    k = default_k(len(train_features)) if k is None else k
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    offset = train_features.float().mean(0) if center else 0.0
    train = nn.functional.normalize(train_features.float() - offset, dim=1)
    test = nn.functional.normalize(test_features.float() - offset, dim=1)
    k = min(k, len(train))
    similarity, neighbours = (test @ train.T).topk(k, dim=1)
    weights = (similarity / temperature).exp()
    votes = torch.zeros(len(test), n_classes).scatter_add_(1, train_labels[neighbours].long(), weights)
    return votes / votes.sum(dim=1, keepdim=True)


def fit_linear_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, n_classes: int, *,
                          weight_decay: float = 1e-3, iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on the features standardised with their mean/std (L2 penalty
    ``weight_decay``, full-batch L-BFGS from zero, deterministic); returns ``(weight [n_classes, D], bias
    [n_classes])`` in float64 acting on the *raw* features (the standardisation folded in)."""
    mean, std = train_features.double().mean(0), train_features.double().std(0).nan_to_num(1.0).clamp_min(1e-6)
    train = (train_features.double() - mean) / std
    layer = nn.Linear(train.shape[1], n_classes).double()
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")
    labels = train_labels.long()

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(layer(train), labels) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        weight = layer.weight / std
        return weight, layer.bias - weight @ mean


def linear_probe_probabilities(train_features: torch.Tensor, train_labels: torch.Tensor,
                               test_features: torch.Tensor, n_classes: int, *, weight_decay: float = 1e-3,
                               iterations: int = 200) -> torch.Tensor:
    """``[n_test, n_classes]`` softmax probabilities of :func:`fit_linear_classifier` on the test features."""
    weight, bias = fit_linear_classifier(train_features, train_labels, n_classes, weight_decay=weight_decay,
                                         iterations=iterations)
    return (test_features.double() @ weight.T + bias).softmax(dim=1).float()
