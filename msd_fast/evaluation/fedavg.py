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

from ..settings import flag
from ..checks import check_positive_int
from .communication import Communication, state_dict_bytes
from ..client.finetune import Recipe, train_classifier


def weighted_average(states: Sequence[dict], weights: Sequence[float]) -> dict:
    """``Σ_i w_i · state_i / Σ_i w_i`` per floating-point entry (accumulated in float64, cast back); integer
    entries (e.g. BatchNorm counters) are taken from the first state."""
    if len(states) != len(weights) or not states:
        raise ValueError("states and weights must be non-empty and of equal length")
    if any(float(w) < 0 for w in weights):
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    for i, state in enumerate(states[1:], 1):
        if state.keys() != states[0].keys():
            raise ValueError(f"states[{i}] has other entries than states[0]: "
                             f"{sorted(set(state) ^ set(states[0]))[:5]}")
        for name, value in state.items():
            if value.shape != states[0][name].shape:
                raise ValueError(f"states[{i}][{name!r}] has shape {tuple(value.shape)}, states[0] "
                                 f"{tuple(states[0][name].shape)}")
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
    """``rounds`` of FedAvg; each round ``max(1, round(client_fraction * n_clients))`` clients (drawn with ``seed``)
    train ``local_steps`` optimisation steps each (rounds x local steps = the fine-tuning steps: the same
    optimisation per client as fine-tuning)."""

    rounds: int = flag(15, "communication rounds")
    local_steps: int = flag(20, "local optimisation steps per round")
    client_fraction: float = flag(1.0, "fraction of the clients sampled per round")
    seed: int = flag(0, "seed of the client sampling")

    def __post_init__(self):
        for name in ("rounds", "local_steps"):
            check_positive_int(getattr(self, name), name)
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"client_fraction must be in (0, 1], got {self.client_fraction}")


def fedavg(model_factory: Callable[[], nn.Module], clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
           recipe: Recipe, settings: FedAvgSettings, *, device: torch.device,
           on_round: Callable[[int], None] | None = None,
           validate: Callable[[nn.Module], float] | None = None) -> tuple[nn.Module, Communication]:
    """Train a global model with FedAvg on ``clients`` (``(images uint8 [n_i, C, H, W], labels [n_i])`` each).

    ``validate(model) -> score`` (the clients' validation accuracy of the global model, higher is better), after
    each round, selects the round whose global model is returned. Returns the global model and the per-client
    communication (averaged over clients: every sampled client downloads the global model and uploads its update
    once per round it takes part in; all rounds are counted, whichever is selected).
    """
    if not clients:
        raise ValueError("clients: FedAvg needs at least one client")
    if not 0 < settings.client_fraction <= 1:
        raise ValueError(f"client_fraction must be in (0, 1], got {settings.client_fraction}")
    global_model = model_factory()
    payload = state_dict_bytes(global_model)
    per_round = max(1, round(settings.client_fraction * len(clients)))
    rng = np.random.Generator(np.random.PCG64(settings.seed))
    total_steps = settings.rounds * settings.local_steps
    participations = np.zeros(len(clients), dtype=np.int64)
    best_score, best_state = -math.inf, None
    for round_index in range(settings.rounds):
        chosen = np.sort(rng.choice(len(clients), size=per_round, replace=False))
        states, weights = [], []
        for client in chosen:
            images, labels = clients[client]
            local = copy.deepcopy(global_model)
            local_recipe = dataclasses.replace(recipe, seed=recipe.seed + 1000 * round_index + int(client))
            train_classifier(local, images, labels, local_recipe, device=device, steps=settings.local_steps,
                             schedule_offset=round_index * settings.local_steps, schedule_total=total_steps)
            states.append({k: v.detach().cpu() for k, v in local.state_dict().items()})
            weights.append(len(images))
            participations[client] += 1
        global_model.load_state_dict(weighted_average(states, weights))
        if validate is not None:
            score = validate(global_model)
            if score > best_score:
                best_score, best_state = score, copy.deepcopy(global_model.state_dict())
        if on_round is not None:
            on_round(round_index)
    if best_state is not None:
        global_model.load_state_dict(best_state)
    mean_participation = float(participations.mean())
    traffic = Communication(upload_bytes=int(round(mean_participation * payload)),
                            download_bytes=int(round(mean_participation * payload)), rounds=settings.rounds)
    return global_model, traffic
