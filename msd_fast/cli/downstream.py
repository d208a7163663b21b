"""Client-side downstream commands: ``msd-fast finetune``, ``msd-fast probe`` and ``msd-fast fedavg``.

* ``finetune``: fine-tune the exported backbone (``--model``, ``--key``; plain or encrypted domain) or, as the
  fine-tuning-only baseline, the same ViT from random init (``--init random``), on labelled images; print accuracy,
  balanced accuracy, macro AUC and the confusion matrix of a held-out split.
* ``probe``: k-NN (cosine) and linear probe on the frozen features of the same two networks.
* ``fedavg``: the supervised FedAvg baseline over simulated clients (plain images), with its communication.

The held-out split is ``--test-fraction`` of ``--data`` (stratified) or a separate ``--test-data``;
``--label-fraction`` keeps a stratified fraction of the training labels. ``--out DIR`` writes the results as JSON
(``finetune.json``, ``probe.json``, ``fedavg.json``; atomically). Each command is a config dataclass composed of the
shared parts (:class:`LabelledData`, :class:`PretrainedModel`, :class:`Architecture`, the
:class:`~msd_fast.client.finetune.Recipe`, the :class:`~msd_fast.evaluation.fedavg.FedAvgSettings`) and a ``run_*``
function of it (``msd_fast.cli.commands`` registers them); user errors are ``ValueError``s naming the flag.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Union


from ..atomic import write_text
from ..checks import is_positive_int, require, resolve_device
from ..data import (SPEC_HELP, DataError, ImageSet, check_patch_size, label_fraction_subset, load_dataset,
                    split_clients, train_test_split)
from ..data.convert import check_image_size
from ..keys import Key
from ..server.export import read_export_metadata
from ..client.classifier import DOMAINS, exported_architecture
from ..evaluation.communication import human_bytes, state_dict_bytes
from ..evaluation.tasks import LabelledSplit, build_classifier, fedavg_baseline, finetune_and_evaluate, probe
from ..evaluation.fedavg import FedAvgSettings
from ..evaluation.probe import default_k
from ..client.finetune import Recipe
from ..settings import Part, build_part, check_required, compose, flag
from .flags import image_size

DEFAULT_ARCH = "vit_tiny_patch16_224"
DEFAULT_PATCH_SIZE = 16
DEFAULT_TEST_FRACTION = 0.2
ARCH_FLAGS = ("depth", "embed_dim", "num_heads", "patch_size")
SPLITS = ("train", "val", "test")
INITS = ("pretrained", "random")


# ---- settings ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LabelledData:
    """The labelled images, the held-out split and the label budget."""

    data: Optional[str] = flag(None, f"labelled data (class sub-folders, a labelled .npz, a .npy with labels, a "
                                     f"manifest with a label column): {SPEC_HELP}", required=True)
    split: str = flag("train", "split of --data to train on (.npz / split folders / synthetic draw)", choices=SPLITS)
    test_fraction: Optional[float] = flag(None, "hold out this stratified fraction of --data for evaluation",
                                          exclusive="held-out", default_text=f"{DEFAULT_TEST_FRACTION}")
    test_data: Optional[str] = flag(None, "evaluate on this dataset instead (same formats)", exclusive="held-out",
                                    default_text="none: a fraction of --data")
    test_split: str = flag("test", "split of --test-data (test: the .npz test split, the test/ folder, an independent "
                                   "synthetic draw; a plain class folder, DICOM, NIfTI or a .csv manifest needs "
                                   "--test-split train)", choices=SPLITS)
    label_fraction: float = flag(1.0, "train on a stratified fraction of the training labels (1: all)")
    image_size: Optional[Union[int, tuple]] = flag(
        None, "resize to S or HxW", parse=image_size,
        default_text="the exported model's size with --model, else as stored; synthetic data: 32")
    channels: Optional[int] = flag(None, "convert to gray (1) or RGB (3)", choices=(1, 3),
                                   default_text="the exported model's with --model, else as stored")
    seed: int = flag(0, "seed of the splits, the initialisation and training")

    def __post_init__(self):
        check_required(self)
        if self.test_fraction is not None and self.test_data is not None:
            raise ValueError("--test-fraction: not allowed with --test-data (one held-out set)")
        if self.test_fraction is not None:
            _fraction(self.test_fraction, "--test-fraction", closed=False)
        _fraction(self.label_fraction, "--label-fraction", closed=True)
        check_image_size(self.image_size, "--image-size")


@dataclasses.dataclass
class PretrainedModel:
    """The exported backbone and its key (or the same network from random init)."""

    model: Optional[str] = flag(None, "the exported backbone (.safetensors from msd-fast export); with --init random "
                                      "only its architecture is used", default_text="none: random init")
    key: Optional[str] = flag(None, "the consortium key the backbone was pretrained with",
                              default_text="none (needed with --model)")
    init: Optional[str] = flag(None, "pretrained, or random: the same network from random init (the "
                                     "fine-tuning-only baseline)", choices=INITS,
                               default_text="pretrained with --model, else random")


@dataclasses.dataclass
class Architecture:
    """The random-init ViT when no --model gives it."""

    arch: Optional[str] = flag(None, "timm ViT name without --model", default_text=DEFAULT_ARCH)
    depth: Optional[int] = flag(None, "override the ViT's depth (without --model)", default_text="--arch's")
    embed_dim: Optional[int] = flag(None, "override the ViT's width (without --model)", default_text="--arch's")
    num_heads: Optional[int] = flag(None, "override the attention heads (without --model)", default_text="--arch's")
    patch_size: Optional[int] = flag(None, "ViT patch size without --model", default_text=f"{DEFAULT_PATCH_SIZE}")

    def __post_init__(self):
        for name in ARCH_FLAGS:
            require(self, name, lambda v: v is None or is_positive_int(v), "a positive integer")


DATA = Part(LabelledData, "data")
MODEL = Part(PretrainedModel, "model")
ARCHITECTURE = Part(Architecture, "architecture (random init without --model)")


@dataclasses.dataclass
@compose(MODEL, ARCHITECTURE, DATA, Part(Recipe, "fine-tuning recipe", exclude=("seed",)))
class FinetuneConfig:
    domain: Optional[str] = flag(None, "plain: the decrypted model on plain images; encrypted: the model as "
                                       "pretrained, on images the classifier encrypts with the key (image mode)",
                                 choices=DOMAINS, default_text="plain")
    device: str = flag("auto", "auto (a GPU when available), cpu, cuda or cuda:N")
    out: Optional[str] = flag(None, "folder to write finetune.json into", default_text="none: print only")

    def __post_init__(self):
        _check_parts(self)
        build_part(self, Recipe, seed=self.seed)


@dataclasses.dataclass
@compose(MODEL, ARCHITECTURE, DATA)
class ProbeConfig:
    k: Optional[int] = flag(None, "neighbours of the k-NN classifier; a k above the number of labelled images is "
                                  "clamped to it, and the k used is printed and written",
                            default_text="sqrt of the labelled images, at most 20")
    device: str = flag("auto", "auto (a GPU when available), cpu, cuda or cuda:N")
    out: Optional[str] = flag(None, "folder to write probe.json into", default_text="none: print only")

    def __post_init__(self):
        _check_parts(self)
        require(self, "k", lambda v: v is None or is_positive_int(v), ">= 1")


@dataclasses.dataclass
@compose(ARCHITECTURE, DATA, Part(FedAvgSettings, "FedAvg", exclude=("seed",)),
         Part(Recipe, "local training recipe", exclude=("seed", "steps", "layer_decay")))
class FedAvgConfig:
    clients: Optional[int] = flag(None, "number of simulated clients", required=True)
    alpha: Optional[float] = flag(None, "non-IID: Dirichlet concentration over classes", default_text="IID")
    model: Optional[str] = flag(None, "take the architecture of this exported backbone (its weights are not used)",
                                default_text="none: --arch")
    device: str = flag("auto", "auto (a GPU when available), cpu, cuda or cuda:N")
    out: Optional[str] = flag(None, "folder to write fedavg.json into", default_text="none: print only")

    def __post_init__(self):
        require(self, "clients", is_positive_int, "a positive integer")
        require(self, "alpha", lambda v: v is None or v > 0, "> 0")
        _check_parts(self)
        self.settings()
        self.recipe()

    def settings(self) -> FedAvgSettings:
        return build_part(self, FedAvgSettings, seed=self.seed)

    def recipe(self) -> Recipe:
        """The clients' local recipe over the whole run (its schedule spans rounds x local steps)."""
        return build_part(self, Recipe, seed=self.seed, steps=self.rounds * self.local_steps)


def _check_parts(config) -> None:
    """The shared parts' own checks, then that the model flags fit together."""
    check_required(config)
    build_part(config, LabelledData)
    build_part(config, Architecture)
    _init(config)


# ---- building blocks -----------------------------------------------------------------------------------------------

def _init(config) -> str:
    """``pretrained`` or ``random`` after checking that the model flags fit together (``fedavg`` has no ``--init``:
    its ``--model`` only names the architecture)."""
    if hasattr(config, "init"):
        init = config.init or ("pretrained" if config.model is not None else "random")
    else:
        init = "random"
    given = [name for name in ("arch", *ARCH_FLAGS) if getattr(config, name) is not None]
    if config.model is not None and given:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag}: the architecture comes from --model {config.model}; drop {flag}")
    if init == "pretrained":
        if config.model is None:
            raise ValueError("--model: --init pretrained needs an exported backbone (or use --init random --arch ...)")
        if config.key is None:
            raise ValueError("--key: a pretrained backbone needs the consortium key it was pretrained with")
    if getattr(config, "domain", None) == "encrypted" and init != "pretrained":
        raise ValueError("--domain encrypted: only a pretrained backbone has an encrypted domain")
    return init


def _fraction(value: float, flag: str, *, closed: bool) -> float:
    if not (0 < value <= 1 if closed else 0 < value < 1):
        raise ValueError(f"{flag} must be in (0, {'1]' if closed else '1)'}, got {value}")
    return value


def load_labelled_data(config, metadata: Optional[dict]) -> tuple[ImageSet, ImageSet, dict]:
    """``(train set, test set, info)``: ``--data`` split by ``--test-fraction`` (stratified, ``--seed``) or ``--data``
    and ``--test-data``, resized/converted to the exported model's geometry by default (``metadata``, or None).
    ``--label-fraction`` is not applied here. ``info`` describes the data for the report and the JSON."""
    size, channels = check_image_size(config.image_size, "--image-size"), config.channels
    if metadata is not None:
        size = size if size is not None else tuple(metadata["image_size"])
        channels = channels if channels is not None else metadata["channels"]
    data = load_dataset(config.data, size=size, channels=channels, split=config.split)
    if data.labels is None:
        raise DataError(f"--data {config.data}: has no labels (supervised evaluation needs class sub-folders, a "
                        "labelled .npz, --data images.npy with labels or a .csv manifest with a label column)")
    if config.test_data is not None:
        test = load_dataset(config.test_data, size=data.geometry[1:], channels=data.channels, split=config.test_split)
        if test.labels is None:
            raise DataError(f"--test-data {config.test_data}: has no labels")
        if data.class_names is not None and test.class_names is not None and data.class_names != test.class_names:
            raise DataError(f"--test-data {config.test_data}: its classes {test.class_names} are not those of --data "
                            f"{data.class_names}; labels would not correspond")
        shared = (set() if data.patient_ids is None or test.patient_ids is None else
                  (set(data.patient_ids) & set(test.patient_ids)) - {""})
        if shared:  # counted, never listed: patient IDs stay out of messages and logs
            raise DataError(f"--test-data {config.test_data}: {len(shared)} patients also have images in --data; a "
                            "held-out set must not share patients with the training data")
        train = data
        held_out = f"{config.test_data} [{config.test_split}]"
    else:
        fraction = _fraction(DEFAULT_TEST_FRACTION if config.test_fraction is None else config.test_fraction,
                             "--test-fraction", closed=False)
        train_rows, test_rows = train_test_split(data.labels, fraction, seed=config.seed, groups=data.groups)
        train, test = data.subset(train_rows), data.subset(test_rows)
        held_out = f"{fraction:g} of --data" + (" (patient-level)" if data.groups is not None else "")
    if metadata is not None:
        expected = (metadata["channels"], *metadata["image_size"])
        if train.geometry != expected:
            raise DataError(f"--data: images are {'x'.join(map(str, train.geometry))} but --model {config.model} takes "
                            f"{'x'.join(map(str, expected))}; drop --image-size/--channels or pass the model's")
    n_classes = max(data.n_classes, test.n_classes)
    info = {"data": data.description, "held_out": held_out, "n_train": len(train), "n_test": len(test),
            "geometry": list(train.geometry), "n_classes": n_classes, "class_names": data.class_names}
    return train, test, info


def labelled_fraction(images: ImageSet, fraction: float, seed: int) -> ImageSet:
    """A stratified ``fraction`` of ``images`` (every class kept; all of them when ``fraction`` is 1)."""
    _fraction(fraction, "--label-fraction", closed=True)
    return images if fraction == 1 else images.subset(label_fraction_subset(images.labels, fraction, seed=seed))


def _architecture(config, metadata: Optional[dict], geometry: tuple[int, int, int]) -> dict:
    """The random-init network: the exported model's, or ``--arch`` and the overrides for this geometry."""
    if metadata is not None:
        return exported_architecture(metadata)
    patch_size = DEFAULT_PATCH_SIZE if config.patch_size is None else config.patch_size
    check_patch_size(geometry, patch_size)
    overrides = {name: getattr(config, name) for name in ("depth", "embed_dim", "num_heads")
                 if getattr(config, name) is not None}
    return dict(arch=config.arch or DEFAULT_ARCH, image_size=tuple(geometry[1:]), patch_size=patch_size,
                in_chans=geometry[0], **overrides)


def _split(train: ImageSet, test: ImageSet, n_classes: int) -> LabelledSplit:
    return LabelledSplit(train.to_tensor(), train.labels, test.to_tensor(), test.labels, n_classes)


def _prepare(config: Union[FinetuneConfig, ProbeConfig]):
    """Everything ``finetune`` and ``probe`` share: the key (read first, so a wrong path fails at once), the data,
    the classifier and a description of the model."""
    init = _init(config)
    metadata = read_export_metadata(config.model) if config.model is not None else None
    domain = getattr(config, "domain", None)
    if domain is not None and init == "pretrained" and metadata["mode"] == "token":
        raise ValueError(f"--domain: {config.model} is a token-mode backbone; its classifier always embeds the images "
                         "with the key-derived token embedder (drop --domain)")
    domain = domain or "plain"
    key = Key.load(config.key) if init == "pretrained" else None
    train, test, info = load_labelled_data(config, metadata)
    train = labelled_fraction(train, config.label_fraction, config.seed)
    info.update(n_train=len(train), label_fraction=config.label_fraction)
    split = _split(train, test, info["n_classes"])
    random_arch = None if init == "pretrained" else _architecture(config, metadata, train.geometry)
    classifier = build_classifier(split, model=config.model if init == "pretrained" else None, key=key, domain=domain,
                                  random_arch=random_arch, seed=config.seed)
    if init == "pretrained":
        model = {"init": "pretrained", "path": config.model, "arch": metadata["arch"], "mode": metadata["mode"],
                 "domain": None if metadata["mode"] == "token" else domain,
                 "key_fingerprint": key.fingerprint, "pretrain_epochs": metadata["epochs"]}
    else:
        model = {"init": "random", "architecture_from": config.model, **random_arch,
                 "image_size": list(random_arch["image_size"])}
    return classifier, split, info, model


def _describe_model(model: dict) -> str:
    if model["init"] == "pretrained":
        where = "key-derived token embedder" if model["mode"] == "token" else f"{model['domain']} domain"
        return (f"pretrained {model['arch']} from {model['path']} ({model['mode']} mode, {where}, key fingerprint "
                f"{model['key_fingerprint']})")
    shape = ", ".join(f"{name.replace('_', ' ')} {model[name]}" for name in ("depth", "embed_dim", "num_heads")
                      if name in model)
    return f"{model['arch']} ({shape + ', ' if shape else ''}patch {model['patch_size']}) from random init"


def _print_metrics(metrics: dict, indent: str = "  ") -> None:
    print(f"{indent}accuracy {metrics['accuracy']:.4f}   balanced accuracy {metrics['balanced_accuracy']:.4f}   "
          f"macro AUC {metrics['macro_auc']:.4f}   (n = {metrics['n']})")


def _print_confusion(matrix: list, class_names: Optional[list], indent: str = "  ") -> None:
    n = len(matrix)
    names = class_names if class_names is not None and len(class_names) == n else [str(c) for c in range(n)]
    width = max(len(str(v)) for row in matrix for v in row)
    label = max(len(name) for name in names)
    print(f"{indent}confusion matrix (rows: true class, columns: predicted class {', '.join(map(str, range(n)))}):")
    for c, (name, row) in enumerate(zip(names, matrix)):
        print(f"{indent}  {c} {name:<{label}}  " + " ".join(f"{v:>{width}}" for v in row))


def write_results(out_dir: str, name: str, results: dict) -> str:
    """Write ``results`` as ``out_dir/name`` (JSON) atomically: a temporary file in the folder, renamed into place
    when complete (an existing file is replaced only by a complete one). Returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    write_text(path, json.dumps(results, indent=2) + "\n")
    return path


def _finish(config: Union[FinetuneConfig, ProbeConfig, FedAvgConfig], name: str, results: dict) -> None:
    if config.out is not None:
        print(f"wrote {write_results(config.out, name, results)}")


# ---- commands ------------------------------------------------------------------------------------------------------

def run_finetune(config: FinetuneConfig) -> int:
    started = time.perf_counter()
    device = resolve_device(config.device)
    recipe = build_part(config, Recipe, seed=config.seed)
    classifier, split, info, model = _prepare(config)
    metrics = finetune_and_evaluate(classifier, split, recipe, device=device, pretrained=model.get("init") != "random")
    print(f"fine-tuned {_describe_model(model)} for {recipe.steps} steps (selected step {metrics['selected_step']} on "
          f"{metrics['n_val']} held-out labelled images) on {info['n_train']} labelled images of "
          f"{info['data']} ({info['n_classes']} classes, label fraction {info['label_fraction']:g}); held-out "
          f"{info['held_out']}: {info['n_test']} images")
    _print_metrics(metrics)
    _print_confusion(metrics["confusion_matrix"], info["class_names"])
    _finish(config, "finetune.json", {"command": "finetune", "model": model, "data": info,
                                    "recipe": dataclasses.asdict(recipe), "device": str(device), "metrics": metrics,
                                    "seconds": time.perf_counter() - started})
    return 0


def run_probe(config: ProbeConfig) -> int:
    started = time.perf_counter()
    device = resolve_device(config.device)
    classifier, split, info, model = _prepare(config)
    k = min(config.k or default_k(len(split.train_labels)), len(split.train_labels))
    if config.k is not None and config.k > k:
        print(f"--k {config.k} is more than the {k} labelled training images: using k = {k}")
    metrics = probe(classifier, split, device=device, k=k)
    print(f"frozen features of {_describe_model(model)}: {info['n_train']} training images of {info['data']} "
          f"({info['n_classes']} classes, label fraction {info['label_fraction']:g}); held-out {info['held_out']}: "
          f"{info['n_test']} images")
    for name, title in (("knn", f"k-NN (k = {k}, cosine of centred features)"), ("linear", "linear probe")):
        print(f"  {title}:")
        _print_metrics(metrics[name], indent="    ")
        _print_confusion(metrics[name]["confusion_matrix"], info["class_names"], indent="    ")
    _finish(config, "probe.json", {"command": "probe", "model": model, "data": info, "k": k,
                                 "device": str(device), "metrics": metrics,
                                 "seconds": time.perf_counter() - started})
    return 0


def run_fedavg(config: FedAvgConfig) -> int:
    started = time.perf_counter()
    device = resolve_device(config.device)
    settings, recipe = config.settings(), config.recipe()
    metadata = read_export_metadata(config.model) if config.model is not None else None
    train, test, info = load_labelled_data(config, metadata)
    random_arch = _architecture(config, metadata, train.geometry)
    test_images = test.to_tensor()
    splits = []
    for c, rows in enumerate(split_clients(train.labels, config.clients, alpha=config.alpha, seed=config.seed,
                                           groups=train.groups)):
        client = labelled_fraction(train.subset(rows), config.label_fraction, config.seed + c)
        splits.append(LabelledSplit(client.to_tensor(), client.labels, test_images, test.labels, info["n_classes"]))
    info.update(n_train=sum(len(s.train_labels) for s in splits), label_fraction=config.label_fraction,
                clients=[len(s.train_labels) for s in splits], alpha=config.alpha)

    from tqdm.auto import tqdm

    with tqdm(total=settings.rounds, desc="fedavg", unit="round", file=sys.stderr, disable=None,
              dynamic_ncols=True) as bar:
        metrics, traffic = fedavg_baseline(splits, random_arch, recipe, settings, device=device,
                                           on_round=lambda _: bar.update(1))
    model_bytes = state_dict_bytes(build_classifier(splits[0], model=None, key=None, random_arch=random_arch,
                                                    seed=config.seed))
    model = {"init": "random", "architecture_from": config.model, **random_arch,
             "image_size": list(random_arch["image_size"])}
    print(f"FedAvg: {_describe_model(model)}, {config.clients} clients "
          f"({'IID' if config.alpha is None else f'Dirichlet alpha {config.alpha:g}'}; labelled images per client "
          f"{info['clients']}), {settings.rounds} rounds x {settings.local_steps} local steps, client fraction "
          f"{settings.client_fraction:g}; held-out {info['held_out']}: {info['n_test']} images")
    _print_metrics(metrics)
    _print_confusion(metrics["confusion_matrix"], info["class_names"])
    print(f"  communication per client: upload {human_bytes(traffic.upload_bytes)} ({traffic.upload_bytes:,} bytes), "
          f"download {human_bytes(traffic.download_bytes)} ({traffic.download_bytes:,} bytes) over {traffic.rounds} "
          f"rounds; model {human_bytes(model_bytes)} ({model_bytes:,} bytes) per transfer")
    _finish(config, "fedavg.json", {"command": "fedavg", "model": model, "data": info,
                                  "settings": dataclasses.asdict(settings), "recipe": dataclasses.asdict(recipe),
                                  "device": str(device), "metrics": metrics,
                                  "communication": {**dataclasses.asdict(traffic), "model_bytes": model_bytes},
                                  "seconds": time.perf_counter() - started})
    return 0
