"""FedAvg-DINO: the self-supervised federated baseline. Every client runs the *same* masked-sampling distillation
as the MS-DINO server (:func:`~msd_fast.server.trainer.distillation_step`: student on masked views, EMA teacher on
every token, :class:`~msd_fast.DINOLoss`, the same optimiser and schedules) locally on its **plain** images for
``local_steps`` per round, and the server averages the student, the teacher and the DINO center, weighted by the
clients' image counts (FedAvg, McMahan et al. 2017, with all clients in every round). Nothing is encrypted: this is
what the clients would do without MS-DINO, paying in rounds and model traffic instead of one upload of the data.

A round plays the part of an epoch in every epoch-indexed setting of the :class:`~msd_fast.server.PretrainConfig`
(learning-rate warm-up, teacher-temperature warm-up, last-layer freezing); the per-step schedules (lr, weight decay,
teacher momentum) run over ``rounds x local_steps`` steps. Each client keeps its own optimiser state across rounds
(never sent). Communication is counted from the serialised payloads: per round, every client downloads the global
``(student, teacher, center)`` and uploads its own; before the first round each uploads its pixel count, sum and sum
of squares so the server can send back the pooled input scaling (mid-grey and the RMS about it, as MS-DINO's server
effectively applies to the ciphertext: :func:`pooled_standardisation`) that every client then uses.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional, Sequence

import torch

from ..checks import check_positive_int
from ..client.classifier import ImageClassifier
from ..protocol.encryption import MAX_VALUE
from ..protocol.shards import ShardMetadata
from ..server.config import PretrainConfig
from ..server.data import epoch_batches
from ..server.model import MaskedSamplingNet
from ..server.monitor import collapse_signals
from ..server.optim import KeyInvariantAdamW
from ..server.seeds import SEED_DROP_PATH, SEED_VIEWS, derived_seed
from ..server.trainer import build_loss, build_networks, distillation_step, parameter_groups, read_losses, schedules
from ..server.views import sample_view_groups
from .communication import Communication, tensors_bytes
from .fedavg import weighted_average

SIGNAL_SAMPLE = 256  # images of client 0 on which the global teacher's collapse signals are measured each round


@dataclasses.dataclass
class FedAvgDINOSettings:
    """``rounds`` of FedAvg-DINO, ``local_steps`` distillation steps per client and round, images of side
    ``patch_size`` blocks, and the ``seed`` of the clients' data order, views and dropout."""

    rounds: int = 20
    local_steps: int = 20
    patch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("rounds", "local_steps", "patch_size"):
            check_positive_int(getattr(self, name), name)


@dataclasses.dataclass
class FedAvgDINOResult:
    """The global teacher and DINO center ``[1, K]`` after the last round (on the CPU), the per-client
    communication, and per-round records (weighted mean local loss and the global teacher's collapse signals)."""

    teacher: MaskedSamplingNet
    center: torch.Tensor
    communication: Communication
    history: list


def plain_geometry(images: torch.Tensor, patch_size: int) -> ShardMetadata:
    """The geometry record of plain uint8 images ``[n, C, H, W]`` (what :func:`build_networks` reads): image mode,
    no key, no encryption."""
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"clients: images must be uint8 [n, C, H, W], got {images.dtype} {tuple(images.shape)}")
    C, H, W = images.shape[1:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image size {H}x{W}")
    return ShardMetadata(mode="image", count=len(images), item_shape=(C, H, W), dtype="uint8", patch_size=patch_size,
                         image_size=(H, W), channels=C, key_fingerprint="", encryption={"scheme": "none"})


def _moments(images: torch.Tensor) -> torch.Tensor:
    """``[values, sum, sum of squares]`` (float64) of a client's pixels: what it uploads before the first round."""
    total, squares = 0.0, 0.0
    for chunk in images.split(256):
        values = chunk.double()
        total, squares = total + float(values.sum()), squares + float((values * values).sum())
    return torch.tensor([float(images.numel()), total, squares], dtype=torch.float64)


def pooled_standardisation(moments: Sequence[torch.Tensor]) -> tuple[float, float]:
    """``(mid-grey, RMS of every client's pixels about mid-grey)`` from their :func:`_moments`: the input scaling the
    MS-DINO server effectively applies. It standardises the dense ciphertext ``A (x/255 - 1/2)`` by its scalar mean
    (about 0, i.e. mid-grey) and std (``A`` is orthogonal: the RMS about mid-grey), so the baseline differs from
    MS-DINO only by running federated on plain pixels. Measured: with the data's own mean and std instead, the same
    distillation learned nothing useful on the embedded set (k-NN 0.23 against 0.52, DESIGN.md)."""
    count, total, squares = (float(v) for v in torch.stack(list(moments)).sum(0))
    centre = MAX_VALUE / 2
    mean_square = (squares - 2 * centre * total + count * centre * centre) / count
    return centre, max(max(mean_square, 0.0) ** 0.5, 1e-6)


class _Client:
    """One client's local networks, loss, optimiser state and data stream."""

    def __init__(self, index: int, images: torch.Tensor, student: MaskedSamplingNet, teacher: MaskedSamplingNet,
                 config: PretrainConfig, device: torch.device):
        """``config``: the run's settings with rounds as epochs (:func:`_rounds_as_epochs`)."""
        self.index, self.images = index, images
        self.student, self.teacher = copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device)
        self.loss = build_loss(config).to(device)
        self.optimizer = KeyInvariantAdamW(parameter_groups(self.student, config.embed_optimizer == "rowwise"))
        self.batch_size = min(config.batch_size, len(images))
        self.steps_per_epoch = len(images) // self.batch_size

    def load(self, payload: dict) -> None:
        self.student.load_state_dict(payload["student"])
        self.teacher.load_state_dict(payload["teacher"])
        with torch.no_grad():
            self.loss.center.copy_(payload["center"])

    def payload(self) -> dict:
        return {"student": _cpu(self.student.state_dict()), "teacher": _cpu(self.teacher.state_dict()),
                "center": self.loss.center.detach().cpu().clone()}

    def batch(self, local_step: int, seed: int) -> torch.Tensor:
        """Rows of this client's ``local_step``-th batch: seeded epochs over its own images, remainder dropped."""
        epoch, i = divmod(local_step, self.steps_per_epoch)
        return epoch_batches(len(self.images), self.batch_size, epoch, seed * 1009 + self.index)[i]


def _rounds_as_epochs(config: PretrainConfig, rounds: int) -> PretrainConfig:
    """The server's settings with a round in the part of an epoch (the loss's teacher-temperature schedule, the
    per-step schedules, last-layer freezing), the warm-ups capped at ``rounds``."""
    return dataclasses.replace(config, epochs=rounds, warmup_epochs=min(config.warmup_epochs, rounds),
                               warmup_teacher_temp_epochs=min(config.warmup_teacher_temp_epochs, rounds))


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _flat(payload: dict) -> dict:
    """A payload as the named tensors that go over the wire."""
    tensors = {f"{part}.{k}": v for part in ("student", "teacher") for k, v in payload[part].items()}
    tensors["center"] = payload["center"]
    return tensors


def fedavg_dino(clients: Sequence[torch.Tensor], config: PretrainConfig, settings: FedAvgDINOSettings, *,
                device: torch.device, on_round: Optional[Callable[[int, dict], None]] = None) -> FedAvgDINOResult:
    """Pretrain with FedAvg-DINO on the clients' plain images (``uint8 [n_i, C, H, W]`` each, one geometry).

    ``config``: the MS-DINO hyperparameters (architecture, head, views, lr at batch 256, temperatures, momentum,
    clipping; its ``shards``/``out``/``epochs`` are not used, see the module docstring); ``config.seed`` initialises
    the global networks. ``on_round(round, record)`` is called after each round's averaging."""
    if not clients:
        raise ValueError("clients: FedAvg-DINO needs at least one client")
    empty = [i for i, images in enumerate(clients) if len(images) == 0]
    if empty:
        raise ValueError(f"clients[{empty[0]}] has no images")
    meta = plain_geometry(clients[0], settings.patch_size)
    for i, images in enumerate(clients):
        if plain_geometry(images, settings.patch_size).item_shape != meta.item_shape:
            raise ValueError(f"clients[{i}] has images of shape {tuple(images.shape[1:])}, clients[0] "
                             f"{meta.item_shape}")
    rounds, local_steps = settings.rounds, settings.local_steps
    moments = [_moments(images) for images in clients]
    standardisation = pooled_standardisation(moments)
    handshake_up = sum(tensors_bytes({"moments": m}) for m in moments) / len(clients)
    handshake_down = tensors_bytes({"standardisation": torch.tensor(standardisation, dtype=torch.float64)})

    student, teacher = build_networks(config, meta, standardisation)
    num_tokens = (meta.image_size[0] // meta.patch_size) * (meta.image_size[1] // meta.patch_size)
    per_round = _rounds_as_epochs(config, rounds)
    locals_ = [_Client(i, images, student, teacher, per_round, device) for i, images in enumerate(clients)]
    weights = [len(images) for images in clients]
    lr, wd, momentum = schedules(per_round, local_steps)
    global_payload = {"student": _cpu(student.state_dict()), "teacher": _cpu(teacher.state_dict()),
                      "center": torch.zeros(1, config.out_dim)}
    up, down, history = 0.0, 0.0, []
    sample = clients[0][torch.linspace(0, len(clients[0]) - 1, min(len(clients[0]), SIGNAL_SAMPLE)).long()]
    for round_index in range(rounds):
        down += tensors_bytes(_flat(global_payload))  # every client receives the same global payload
        uploads, round_loss = [], 0.0
        for client in locals_:
            losses = []
            client.load(global_payload)
            client.student.train()
            client.teacher.train()
            for t in range(local_steps):
                step = round_index * local_steps + t
                inputs = client.images[client.batch(step, settings.seed)].to(device)
                generator = torch.Generator().manual_seed(derived_seed(settings.seed, SEED_VIEWS, client.index, step))
                views = sample_view_groups(config, len(inputs), num_tokens, generator).select(
                    0, len(inputs), device, num_tokens)
                torch.manual_seed(derived_seed(settings.seed, SEED_DROP_PATH, client.index, step))
                losses.append(distillation_step(
                    client.student, client.teacher, client.loss, client.optimizer, inputs, views, config,
                    num_tokens=num_tokens, epoch=round_index, step=step, lr=float(lr[step]),
                    weight_decay=float(wd[step]), momentum=float(momentum[step])))
            values = read_losses(losses, round_index * local_steps)
            round_loss += weights[client.index] / sum(weights) * sum(values) / len(values)
            uploads.append(client.payload())
            up += tensors_bytes(_flat(uploads[-1])) / len(locals_)
        global_payload = {part: weighted_average([u[part] for u in uploads], weights) for part in ("student",
                                                                                                   "teacher")}
        global_payload["center"] = weighted_average([{"c": u["center"]} for u in uploads], weights)["c"]
        teacher.load_state_dict(global_payload["teacher"])
        record = {"round": round_index, "loss": round_loss,
                  **collapse_signals(teacher, sample, global_payload["center"],
                                     float(locals_[0].loss.teacher_temp_schedule[round_index]))}
        history.append(record)
        if on_round is not None:
            on_round(round_index, record)
    traffic = Communication(upload_bytes=int(round(handshake_up + up)),
                            download_bytes=int(round(handshake_down + down)), rounds=rounds)
    return FedAvgDINOResult(teacher.eval(), global_payload["center"], traffic, history)


def fedavg_dino_classifier(teacher: MaskedSamplingNet, n_classes: int, *, seed: int = 0) -> ImageClassifier:
    """A client's classifier from the global teacher: its backbone (a copy) with a fresh linear head of
    ``n_classes`` outputs initialised from ``seed``, on raw plain images standardised with the federation's pooled
    statistics (the ones the backbone was trained with)."""
    vit = copy.deepcopy(teacher.backbone).cpu()
    torch.manual_seed(seed)
    vit.reset_classifier(n_classes)
    return ImageClassifier(vit, mean=float(teacher.input_mean), std=float(teacher.input_std))
