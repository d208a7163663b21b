"""Collapse signals of a pretraining run, measured on the server's own data (no labels, no key).

DINO-style training can collapse in two ways (Caron et al. 2021, sec. 5.3): every input mapped to the same
prototype (the teacher's per-sample entropy drops to 0 and the entropy of its *mean* prediction too), or to a uniform
output (both entropies at ln K). A BatchNorm head can hide a third failure: the backbone's features shrink and
lose rank while the head rescales them. :func:`collapse_signals` reports all three, on the teacher, from all tokens
of a fixed sample of the shards.
"""
from __future__ import annotations

import math

import torch

from .model import MaskedSamplingNet


def effective_rank(features: torch.Tensor) -> float:
    """``exp(entropy of the normalised singular values)`` of the centred ``features [n, D]`` (Roy & Vetterli 2007):
    1 for features on a line, ``min(n, D)`` for isotropic ones."""
    centred = features.double() - features.double().mean(0)
    singular = torch.linalg.svdvals(centred)
    if float(singular.sum()) == 0:
        return 0.0
    weights = singular / singular.sum()
    return float(torch.exp(-(weights * torch.log(weights.clamp_min(1e-300))).sum()))


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of ``probabilities [..., K]``."""
    return -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum(-1)


@torch.no_grad()
def collapse_signals(teacher: MaskedSamplingNet, inputs: torch.Tensor, center: torch.Tensor,
                     teacher_temp: float) -> dict:
    """Signals of the ``teacher`` on ``inputs`` (all tokens, eval mode; restored afterwards):

    ``teacher_entropy``: mean per-sample entropy of ``softmax((logits - center) / teacher_temp)`` (0 = one-hot,
    ``ln K`` = uniform); ``usage_entropy``: entropy of the batch-mean prediction (low = few prototypes used);
    ``feature_std``: mean per-dimension std of the backbone features; ``effective_rank`` of those features."""
    was_training = teacher.training
    teacher.eval()
    try:
        features = teacher.features(inputs).float()
        logits = teacher.head(features).float()
    finally:
        teacher.train(was_training)
    probabilities = torch.softmax((logits - center.view(1, -1).float()) / teacher_temp, dim=-1)
    return {"teacher_entropy": float(entropy(probabilities).mean()),
            "usage_entropy": float(entropy(probabilities.mean(0))),
            "uniform_entropy": math.log(logits.shape[1]),
            "feature_std": float(features.std(0).mean()),
            "effective_rank": effective_rank(features.cpu())}
