"""Client-side evaluation tasks shared by the CLI and the demo: fine-tune and evaluate a classifier, probe frozen
features, and the FedAvg baseline -- each returning plain dictionaries of metrics."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..keys import Key
from .classifier import pretrained_classifier, random_classifier
from .fedavg import FedAvgSettings, fedavg
from .metrics import classification_metrics
from .probe import knn_probabilities, linear_probe_probabilities
from .training import Recipe, extract_features, predict, standardisation, train_classifier


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
    random-init baseline described by ``random_arch`` (``arch`` + timm kwargs)."""
    mean, std = standardisation(split.train_images)
    if model is not None:
        if key is None:
            raise ValueError("key: fine-tuning a pretrained model needs the consortium key")
        return pretrained_classifier(model, key, split.n_classes, mean=mean, std=std, domain=domain)
    if random_arch is None:
        raise ValueError("random_arch: the random-init baseline needs an architecture")
    arch = dict(random_arch)
    return random_classifier(arch.pop("arch"), split.n_classes, mean=mean, std=std, seed=seed, **arch)


def finetune_and_evaluate(classifier, split: LabelledSplit, recipe: Recipe, *, device: torch.device) -> dict:
    """Fine-tune ``classifier`` on the split's labelled images; metrics on its test set."""
    train_classifier(classifier, split.train_images, split.train_labels, recipe, device=device)
    probabilities = predict(classifier, split.test_images, device=device)
    return classification_metrics(probabilities, split.test_labels)


def probe(classifier, split: LabelledSplit, *, device: torch.device, k: int = 20) -> dict:
    """k-NN (cosine, ``k``) and linear-probe metrics on the frozen features of ``classifier``'s backbone."""
    train = extract_features(classifier, split.train_images, device=device)
    test = extract_features(classifier, split.test_images, device=device)
    knn = knn_probabilities(train, split.train_labels, test, split.n_classes, k=k)
    linear = linear_probe_probabilities(train, split.train_labels, test, split.n_classes)
    return {"knn": classification_metrics(knn, split.test_labels),
            "linear": classification_metrics(linear, split.test_labels)}


def fedavg_baseline(splits: list[LabelledSplit], random_arch: dict, recipe: Recipe, settings: FedAvgSettings, *,
                    device: torch.device, on_round=None) -> tuple[dict, object]:
    """Supervised FedAvg over the clients' labelled images (plain domain); metrics of the global model on the
    (shared) test set of the first split, and the per-client communication."""
    mean, std = standardisation(torch.cat([s.train_images for s in splits]))

    def factory():
        arch = dict(random_arch)
        return random_classifier(arch.pop("arch"), splits[0].n_classes, mean=mean, std=std, seed=settings.seed,
                                 **arch)

    model, traffic = fedavg(factory, [(s.train_images, s.train_labels) for s in splits], recipe, settings,
                            device=device, on_round=on_round)
    probabilities = predict(model, splits[0].test_images, device=device)
    return classification_metrics(probabilities, splits[0].test_labels), traffic
