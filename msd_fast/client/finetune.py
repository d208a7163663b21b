"""The one supervised recipe every method shares (fine-tuning, the from-scratch baseline, FedAvg's local steps).

Built for few labels (DESIGN.md, "How learning quality is judged"): a fixed number of optimisation *steps* (not
epochs: 35 labelled images and 4,000 get the same optimisation), an unscaled peak learning rate with linear
warm-up and cosine decay, AdamW, label smoothing, layer-wise learning-rate decay when the body is pretrained, no
flips by default (orientation and laterality carry meaning in medical images), and model selection on a
validation split that the client holds out of its own labelled images -- never on the test set.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..settings import flag
from ..checks import check_positive_int
from ..server.schedules import cosine_schedule


@dataclasses.dataclass
class Recipe:
    """Supervised training settings (see the module docstring).

    ``steps`` optimisation steps of ``min(batch_size, n)`` images, the first ``warmup_steps`` (default a tenth)
    warming up linearly; ``lr`` is the peak learning rate (no batch scaling); ``layer_decay`` < 1 scales block ``i`` of a pretrained body by ``layer_decay ** (depth - i)`` and its
    embeddings by ``layer_decay ** (depth + 1)`` (1: off; random-init bodies always use 1); ``val_fraction`` of the
    labelled images (stratified) is held out for model selection every ``eval_every`` steps when at least
    ``min_val`` images would be held out, else the last step is kept. ``probe_init``: start from a linear probe
    (the head fitted on the frozen features, then every weight fine-tuned: LP-FT, Kumar et al. 2022), so that the
    first steps do not distort pretrained features through a random head; the probe itself (step 0) is a
    candidate of the selection. ``refit_head``: once the step is selected, the linear head is fitted again (the same
    logistic regression) on the selected body's frozen features of *every* labelled image, the validation images
    included: with a few labels per class, a fifth of them is too many to leave out of the final classifier."""

    steps: int = flag(300, "optimisation steps, whatever the number of labels")
    batch_size: int = flag(32, "images per step (at most the labelled images)")
    lr: float = flag(1e-3, "peak learning rate (not scaled with the batch)")
    min_lr: float = flag(1e-6, "final learning rate of the cosine decay")
    warmup_steps: Optional[int] = flag(None, "linear learning-rate warm-up steps", default_text="a tenth of the steps")
    weight_decay: float = flag(0.05, "AdamW weight decay")
    layer_decay: float = flag(0.75, "layer-wise lr decay of a pretrained body (1: off; random init: always off)")
    label_smoothing: float = flag(0.1, "label smoothing of the cross-entropy")
    flips: bool = flag(False, "random horizontal/vertical flips (off by default: laterality and orientation can "
                              "carry the label)")
    probe_init: bool = flag(True, "start from a linear probe on the frozen features (LP-FT)")
    refit_head: bool = flag(True, "after selecting the step, refit the linear head on every labelled image, the "
                                  "held-out ones included")
    val_fraction: float = flag(0.2, "labelled images held out to select the step (0: keep the last step)")
    min_val: int = flag(5, "fewest held-out images for a selection (fewer: keep the last step)")
    eval_every: int = flag(25, "steps between two evaluations on the held-out images")
    seed: int = flag(0, "seed of the validation split, the batches and the flips")

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "min_val"):
            check_positive_int(getattr(self, name), name)
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 10
        if not (isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.steps):
            raise ValueError(f"warmup_steps must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}")
        for name in ("lr", "min_lr", "weight_decay", "label_smoothing", "layer_decay", "val_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


def standardisation(images: torch.Tensor, *, chunk_size: int = 256) -> tuple[float, float]:
    """Scalar mean and (unbiased) std of uint8-range ``images [n, ...]`` (the client's own input standardisation).

    Two float64 passes over ``chunk_size`` images at a time, so the extra memory is a chunk, not a float64 copy of
    the whole set (12 GB for 10k RGB images at 224x224)."""
    if images.numel() < 2:
        raise ValueError(f"images: need at least two values for a standard deviation, got shape "
                         f"{tuple(images.shape)}")
    chunks = [images[i:i + chunk_size] for i in range(0, len(images), chunk_size)]
    mean = sum(float(chunk.double().sum()) for chunk in chunks) / images.numel()
    squares = sum(float((chunk.double() - mean).square().sum()) for chunk in chunks)
    return mean, max((squares / (images.numel() - 1)) ** 0.5, 1e-6)


def validation_split(labels: torch.Tensor, fraction: float, *, min_val: int, seed: int
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(train_rows, val_rows)`` of ``labels [n]``: a stratified ``fraction`` held out (at least one image of every
    class with two or more images is kept for training); ``val_rows`` is None when fewer than ``min_val`` images
    would be held out (then there is no model selection)."""
    n = len(labels)
    if fraction == 0 or round(fraction * n) < min_val:
        return torch.arange(n), None
    rng = np.random.Generator(np.random.PCG64(seed))
    labels_np = labels.cpu().numpy()
    val = []
    for label in np.unique(labels_np):
        rows = np.flatnonzero(labels_np == label)
        rows = rows[rng.permutation(len(rows))]
        take = min(len(rows) - 1, int(round(fraction * len(rows))))
        val.extend(rows[:max(take, 0)].tolist())
    if len(val) < min_val:
        return torch.arange(n), None
    val_rows = torch.tensor(sorted(val))
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_rows] = False
    return torch.nonzero(keep).view(-1), val_rows


def _flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    horizontal = torch.rand(batch.shape[0], generator=generator) < 0.5
    vertical = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = torch.where(horizontal.view(-1, 1, 1, 1), batch.flip(3), batch)
    return torch.where(vertical.view(-1, 1, 1, 1), batch.flip(2), batch)


def _layer_id(name: str, depth: int) -> int:
    """0 for the embeddings (patch/position/class/register tokens), ``i + 1`` for block ``i``, ``depth + 1`` for the
    final norm and the head (BEiT/MAE's layer-wise decay assignment)."""
    if ".blocks." in name or name.startswith("blocks."):
        return int(name.split("blocks.")[1].split(".")[0]) + 1
    if any(part in name for part in ("patch_embed", "pos_embed", "cls_token", "reg_token", "embedder")):
        return 0
    return depth + 1


def parameter_groups(model: nn.Module, recipe: Recipe, *, pretrained: bool) -> list[dict]:
    """AdamW groups: weight decay on matrices only, and a learning-rate scale per layer (``layer_decay`` for a
    pretrained body, 1 otherwise). Each group carries ``lr_scale``."""
    depth = max((int(n.split("blocks.")[1].split(".")[0]) + 1 for n, _ in model.named_parameters()
                 if "blocks." in n), default=0)
    decay = recipe.layer_decay if pretrained else 1.0
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = _layer_id(name, depth)
        decayed = param.dim() > 1 and not any(t in name for t in ("pos_embed", "cls_token", "reg_token"))
        group = groups.setdefault((layer, decayed), {
            "params": [], "weight_decay": recipe.weight_decay if decayed else 0.0,
            "lr_scale": decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return list(groups.values())


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, *,
                     device: torch.device, pretrained: bool = False, steps: Optional[int] = None,
                     schedule_offset: int = 0, schedule_total: Optional[int] = None,
                     validate: Optional[Callable[[nn.Module], float]] = None) -> dict:
    """Train ``model`` (images ``uint8 [n, C, H, W]`` -> logits) on ``labels [n]`` with ``recipe``, in place.

    ``steps`` overrides ``recipe.steps``; FedAvg's local training passes ``schedule_offset``/``schedule_total`` so
    the learning-rate schedule runs over all rounds instead of restarting each round. ``validate(model) -> score``
    (higher is better), called every ``recipe.eval_every`` steps and at the end, selects the weights that are kept.
    Returns ``{"steps", "selected_step", "val_score"}``.
    """
    steps = recipe.steps if steps is None else steps
    total = schedule_total or steps
    schedule = cosine_schedule(recipe.lr, recipe.min_lr, total, 1, warmup_epochs=min(recipe.warmup_steps, total))
    model.to(device).train()
    groups = parameter_groups(model, recipe, pretrained=pretrained)
    optimizer = torch.optim.AdamW(groups)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    generator = torch.Generator().manual_seed(recipe.seed * 7919 + schedule_offset)
    batch_size = min(recipe.batch_size, len(images))
    best = {"score": -math.inf, "state": None, "step": steps}
    order, cursor = torch.randperm(len(images), generator=generator), 0

    def select(step: int) -> None:
        score = validate(model)
        model.train()
        if score > best["score"]:
            best.update(score=score, step=step, state=copy.deepcopy(model.state_dict()))

    if recipe.probe_init and hasattr(model, "features") and schedule_offset == 0:
        fit_head(model, images, labels, device=device)
        if validate is not None:
            select(0)

    for step in range(steps):
        if cursor + batch_size > len(images):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        rows = order[cursor:cursor + batch_size]
        cursor += batch_size
        batch = images[rows]
        if recipe.flips:
            batch = _flip(batch, generator)
        lr = float(schedule[min(schedule_offset + step, total - 1)])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss = criterion(model(batch.to(device)), labels[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if validate is not None and ((step + 1) % recipe.eval_every == 0 or step + 1 == steps):
            select(step + 1)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {"steps": steps, "selected_step": best["step"],
            "val_score": None if validate is None else float(best["score"])}


@torch.no_grad()
def fit_head(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device) -> None:
    """Set the classifier's linear head (``model.vit.head``) to a logistic regression on the frozen features of
    ``images`` (:func:`~msd_fast.evaluation.probe.fit_linear_classifier`)."""
    from ..evaluation.probe import fit_linear_classifier

    head = model.vit.head
    features = extract_features(model, images, device=device)
    weight, bias = fit_linear_classifier(features, labels, head.out_features)
    head.weight.copy_(weight.to(head.weight))
    head.bias.copy_(bias.to(head.bias))
    model.train()


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
