"""Client-side evaluation tasks shared by the CLI and the demo: fine-tune and evaluate a classifier, probe frozen
features, and the FedAvg baseline -- each returning plain dictionaries of metrics."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..keys import Key
from ..client.classifier import pretrained_classifier, random_classifier
from .fedavg import FedAvgSettings, fedavg
from .metrics import classification_metrics
from .probe import knn_probabilities, linear_probe_probabilities
from ..client.finetune import (Recipe, extract_features, fit_head, predict, standardisation, train_classifier,
                       validation_split)


@dataclasses.dataclass
class LabelledSplit:
    """One client's labelled training images and the held-out test set (uint8 images, int64 labels)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    n_classes: int


def build_classifier(split: LabelledSplit, *, model: Optional[str], key: Optional[Key], domain: str = "plain",
                     random_arch: Optional[dict] = None, seed: int = 0):
    """A pretrained classifier (``model`` = exported backbone, with ``key``) or, with ``model=None``, the
    random-init baseline described by ``random_arch`` (``arch``, ``image_size``, ``patch_size``, ``in_chans`` and
    further timm kwargs). ``seed`` initialises the new head (pretrained) or the whole network (random init)."""
    mean, std = standardisation(split.train_images)
    if model is not None:
        if key is None:
            raise ValueError("key: fine-tuning a pretrained model needs the consortium key")
        return pretrained_classifier(model, key, split.n_classes, mean=mean, std=std, domain=domain, seed=seed)
    if random_arch is None:
        raise ValueError("random_arch: the random-init baseline needs an architecture")
    arch = dict(random_arch)
    return random_classifier(arch.pop("arch"), split.n_classes, mean=mean, std=std, seed=seed, **arch)


def validation_score(images: torch.Tensor, labels: torch.Tensor, *, device: torch.device):
    """``score(model)``: accuracy on the client's validation images, minus 1e-3 x their mean cross-entropy (so
    ties in accuracy go to the more confident model)."""
    def score(model) -> float:
        probabilities = predict(model, images, device=device)
        accuracy = float((probabilities.argmax(1) == labels).float().mean())
        nll = float(-probabilities[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())
        return accuracy - 1e-3 * nll
    return score


def finetune_and_evaluate(classifier, split: LabelledSplit, recipe: Recipe, *, device: torch.device,
                          pretrained: bool = False) -> dict:
    """Fine-tune ``classifier`` on the split's labelled images, selecting the weights on a validation split the
    client holds out of them (:func:`~msd_fast.client.finetune.validation_split`), then (``recipe.refit_head``)
    refitting the head on all of them; metrics on the test set, plus ``selected_step`` and ``n_val``.
    ``pretrained`` turns on the recipe's layer-wise learning-rate decay."""
    train_rows, val_rows = validation_split(split.train_labels, recipe.val_fraction, min_val=recipe.min_val,
                                            seed=recipe.seed)
    validate = None if val_rows is None else validation_score(split.train_images[val_rows],
                                                              split.train_labels[val_rows].long(), device=device)
    info = train_classifier(classifier, split.train_images[train_rows], split.train_labels[train_rows], recipe,
                            device=device, pretrained=pretrained, validate=validate)
    if recipe.refit_head and val_rows is not None:
        fit_head(classifier, split.train_images, split.train_labels, device=device)
    probabilities = predict(classifier, split.test_images, device=device)
    return {**classification_metrics(probabilities, split.test_labels), "selected_step": info["selected_step"],
            "n_val": 0 if val_rows is None else len(val_rows)}


def probe(classifier, split: LabelledSplit, *, device: torch.device, k: Optional[int] = None) -> dict:
    """k-NN (cosine of centred features, ``k`` default scaled with the labels) and linear-probe metrics on the
    frozen features of ``classifier``'s backbone."""
    train = extract_features(classifier, split.train_images, device=device)
    test = extract_features(classifier, split.test_images, device=device)
    knn = knn_probabilities(train, split.train_labels, test, split.n_classes, k=k)
    linear = linear_probe_probabilities(train, split.train_labels, test, split.n_classes)
    return {"knn": classification_metrics(knn, split.test_labels),
            "linear": classification_metrics(linear, split.test_labels)}


def fedavg_baseline(splits: list[LabelledSplit], random_arch: dict, recipe: Recipe, settings: FedAvgSettings, *,
                    device: torch.device, on_round=None) -> tuple[dict, object]:
    """Supervised FedAvg over the clients' labelled images (plain domain). Each client holds out the same
    validation split as in fine-tuning; the round whose global model scores best on the clients' pooled validation
    images is kept. Metrics of that global model on the (shared) test set of the first split, and the per-client
    communication. ``recipe.refit_head`` does not apply: refitting the global head on one client's labels lowered
    FedAvg's accuracy (DESIGN.md), so the baseline keeps the stronger, conventional global model."""
    mean, std = standardisation(torch.cat([s.train_images for s in splits]))
    clients, val_images, val_labels = [], [], []
    for split in splits:
        train_rows, val_rows = validation_split(split.train_labels, recipe.val_fraction, min_val=recipe.min_val,
                                                seed=recipe.seed)
        clients.append((split.train_images[train_rows], split.train_labels[train_rows]))
        if val_rows is not None:
            val_images.append(split.train_images[val_rows])
            val_labels.append(split.train_labels[val_rows].long())
    validate = (validation_score(torch.cat(val_images), torch.cat(val_labels), device=device)
                if val_images else None)

    def factory():
        arch = dict(random_arch)
        return random_classifier(arch.pop("arch"), splits[0].n_classes, mean=mean, std=std, seed=settings.seed,
                                 **arch)

    model, traffic = fedavg(factory, clients, recipe, settings, device=device, on_round=on_round, validate=validate)
    probabilities = predict(model, splits[0].test_images, device=device)
    return classification_metrics(probabilities, splits[0].test_labels), traffic
