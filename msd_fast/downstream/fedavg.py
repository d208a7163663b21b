"""Supervised FedAvg (McMahan et al. 2017) over simulated clients, on the plain images (as federated learning
would), with the same recipe as fine-tuning: each round, a sampled subset of clients trains the current global model
for some local epochs and the server averages their weights, weighted by their number of labelled images."""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .communication import Communication, state_dict_bytes
from .training import Recipe, train_classifier


def weighted_average(states: Sequence[dict], weights: Sequence[float]) -> dict:
    """``Σ_i w_i · state_i / Σ_i w_i`` per floating-point entry (accumulated in float64, cast back); integer
    entries (e.g. BatchNorm counters) are taken from the first state."""
    if len(states) != len(weights) or not states:
        raise ValueError("states and weights must be non-empty and of equal length")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    averaged = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            averaged[name] = first.clone()
            continue
        accumulator = torch.zeros_like(first, dtype=torch.float64)
        for state, weight in zip(states, weights):
            accumulator += state[name].double() * (float(weight) / total)
        averaged[name] = accumulator.to(first.dtype)
    return averaged


@dataclasses.dataclass
class FedAvgSettings:
    rounds: int = 20
    local_epochs: int = 1
    client_fraction: float = 1.0
    seed: int = 0


def fedavg(model_factory: Callable[[], nn.Module], clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
           recipe: Recipe, settings: FedAvgSettings, *, device: torch.device,
           on_round: Callable[[int], None] | None = None) -> tuple[nn.Module, Communication]:
    """Train a global model with FedAvg on ``clients`` (``(images uint8 [n_i, C, H, W], labels [n_i])`` each).

    Returns the global model and the per-client communication (averaged over clients: every sampled client
    downloads the global model and uploads its update once per round it takes part in).
    """
    if not 0 < settings.client_fraction <= 1:
        raise ValueError(f"client_fraction must be in (0, 1], got {settings.client_fraction}")
    global_model = model_factory()
    payload = state_dict_bytes(global_model)
    per_round = max(1, round(settings.client_fraction * len(clients)))
    rng = np.random.Generator(np.random.PCG64(settings.seed))
    largest = max(len(images) for images, _ in clients)
    steps_per_round = settings.local_epochs * math.ceil(largest / recipe.batch_size)
    total_steps = settings.rounds * steps_per_round
    participations = np.zeros(len(clients), dtype=np.int64)
    for round_index in range(settings.rounds):
        chosen = np.sort(rng.choice(len(clients), size=per_round, replace=False))
        states, weights = [], []
        for client in chosen:
            images, labels = clients[client]
            local = copy.deepcopy(global_model)
            local_recipe = dataclasses.replace(recipe, seed=recipe.seed + 1000 * round_index + int(client))
            train_classifier(local, images, labels, local_recipe, device=device, epochs=settings.local_epochs,
                             lr_offset_step=round_index * steps_per_round, total_steps=total_steps)
            states.append({k: v.detach().cpu() for k, v in local.state_dict().items()})
            weights.append(len(images))
            participations[client] += 1
        global_model.load_state_dict(weighted_average(states, weights))
        if on_round is not None:
            on_round(round_index)
    mean_participation = float(participations.mean())
    traffic = Communication(upload_bytes=int(round(mean_participation * payload)),
                            download_bytes=int(round(mean_participation * payload)), rounds=settings.rounds)
    return global_model, traffic
