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


def linear_probe_probabilities(train_features: torch.Tensor, train_labels: torch.Tensor,
                               test_features: torch.Tensor, n_classes: int, *, weight_decay: float = 1e-3,
                               iterations: int = 200) -> torch.Tensor:
    """``[n_test, n_classes]`` softmax probabilities of a logistic regression fitted on the training features
    (standardised with the training mean/std, L2 penalty ``weight_decay``), deterministic."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    train = ((train_features - mean) / std).double()
    test = ((test_features - mean) / std).double()
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
        return layer(test).softmax(dim=1).float()
