"""The one supervised recipe every method shares (fine-tuning, the from-scratch baseline, FedAvg's local steps):
AdamW, linear warm-up then cosine learning rate, label smoothing, random horizontal/vertical flips."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..pretrain.schedules import cosine_schedule


@dataclasses.dataclass
class Recipe:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    flips: bool = True
    seed: int = 0


def standardisation(images: torch.Tensor) -> tuple[float, float]:
    """Scalar mean and std of uint8-range ``images`` (the client's own input standardisation)."""
    values = images.double()
    return float(values.mean()), float(values.std().clamp_min(1e-6))


def _flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    horizontal = torch.rand(batch.shape[0], generator=generator) < 0.5
    vertical = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = torch.where(horizontal.view(-1, 1, 1, 1), batch.flip(3), batch)
    return torch.where(vertical.view(-1, 1, 1, 1), batch.flip(2), batch)


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, *,
                     device: torch.device, epochs: int | None = None, lr_offset_step: int = 0,
                     total_steps: int | None = None) -> nn.Module:
    """Train ``model`` (images ``uint8 [n, C, H, W]`` -> logits) on ``labels [n]`` with ``recipe`` in place.

    ``epochs`` overrides ``recipe.epochs``; FedAvg's local training passes ``lr_offset_step``/``total_steps`` so
    that the learning-rate schedule runs over all rounds instead of restarting each round.
    """
    epochs = recipe.epochs if epochs is None else epochs
    steps_per_epoch = max(1, math.ceil(len(images) / recipe.batch_size))
    total = total_steps or epochs * steps_per_epoch
    schedule = cosine_schedule(recipe.lr * recipe.batch_size / 256.0, recipe.min_lr, total, 1,
                               warmup_epochs=min(recipe.warmup_epochs * steps_per_epoch, total))
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}])
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    generator = torch.Generator().manual_seed(recipe.seed * 7919 + lr_offset_step)
    step = lr_offset_step
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), recipe.batch_size):
            rows = order[start:start + recipe.batch_size]
            batch = images[rows]
            if recipe.flips:
                batch = _flip(batch, generator)
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[min(step, total - 1)])
            loss = criterion(model(batch.to(device)), labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities ``float32 [n, n_classes]`` of ``model`` in eval mode."""
    model.to(device).eval()
    outputs = [model(images[i:i + batch_size].to(device)).float().softmax(dim=1).cpu()
               for i in range(0, len(images), batch_size)]
    return torch.cat(outputs)


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, *, device: torch.device,
                     batch_size: int = 256) -> torch.Tensor:
    """Frozen features ``float32 [n, D]`` (``model.features``) in eval mode."""
    model.to(device).eval()
    return torch.cat([model.features(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])
