"""Client-side downstream commands: ``msd-fast finetune``, ``msd-fast probe`` and ``msd-fast fedavg``.

* ``finetune``: fine-tune the exported backbone (``--model``, ``--key``; plain or encrypted domain) or, as the
  fine-tuning-only baseline, the same ViT from random init (``--init random``), on labelled images; print accuracy,
  balanced accuracy, macro AUC and the confusion matrix of a held-out split.
* ``probe``: k-NN (cosine) and linear probe on the frozen features of the same two networks.
* ``fedavg``: the supervised FedAvg baseline over simulated clients (plain images), with its communication.

The held-out split is ``--test-fraction`` of ``--data`` (stratified) or a separate ``--test-data``;
``--label-fraction`` keeps a stratified fraction of the training labels. ``--out DIR`` writes the results as JSON
(``finetune.json``, ``probe.json``, ``fedavg.json``; atomically). Each ``add_*_arguments`` fills a subparser, each
``run_*`` runs it from the parsed arguments (``msd_fast.cli.commands`` registers them); user errors are ``ValueError``s
naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

import torch

from ..atomic import write_text
from ..checks import resolve_device
from ..client.encode import _image_size
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

DEFAULT_ARCH = "vit_tiny_patch16_224"
DEFAULT_PATCH_SIZE = 16
DEFAULT_TEST_FRACTION = 0.2
ARCH_FLAGS = ("depth", "embed_dim", "num_heads", "patch_size")


# ---- arguments -----------------------------------------------------------------------------------------------------

def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help=f"labelled data (class sub-folders, a labelled .npz, a .npy with labels, a manifest "
                             f"with a label column): {SPEC_HELP}")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"),
                        help="split of --data to train on (.npz / split folders / synthetic draw; default train)")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--test-fraction", type=float, default=None,
                          help=f"hold out this stratified fraction of --data for evaluation (default "
                               f"{DEFAULT_TEST_FRACTION})")
    held_out.add_argument("--test-data", default=None, help="evaluate on this dataset instead (same formats)")
    parser.add_argument("--test-split", default="test", choices=("train", "val", "test"),
                        help="split of --test-data (default test: the .npz test split, the test/ folder, an "
                             "independent synthetic draw; a plain class folder, DICOM, NIfTI or a .csv manifest "
                             "needs --test-split train)")
    parser.add_argument("--label-fraction", type=float, default=1.0,
                        help="train on a stratified fraction of the training labels (default 1: all)")
    parser.add_argument("--image-size", type=_image_size, default=None,
                        help="resize to S or HxW (default: the exported model's size with --model, else as stored; "
                             "synthetic data: the generated size, default 32)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="convert to gray (1) or RGB (3) (default: the exported model's with --model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, the initialisation and training")


def _add_model_arguments(parser: argparse.ArgumentParser, *, pretrained: bool) -> None:
    if pretrained:
        parser.add_argument("--model", default=None,
                            help="the exported backbone (.safetensors from msd-fast export); with --init random only "
                                 "its architecture is used")
        parser.add_argument("--key", default=None, help="the consortium key the backbone was pretrained with")
        parser.add_argument("--init", choices=("pretrained", "random"), default=None,
                            help="pretrained (default with --model) or random: the same network from random init "
                                 "(the fine-tuning-only baseline)")
    else:
        parser.add_argument("--model", default=None,
                            help="take the architecture of this exported backbone (its weights are not used)")
    parser.add_argument("--arch", default=None, help=f"timm ViT name without --model (default {DEFAULT_ARCH})")
    parser.add_argument("--depth", type=int, default=None, help="override the ViT's depth (without --model)")
    parser.add_argument("--embed-dim", type=int, default=None, help="override the ViT's width (without --model)")
    parser.add_argument("--num-heads", type=int, default=None, help="override the attention heads (without --model)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help=f"ViT patch size without --model (default {DEFAULT_PATCH_SIZE})")


def _add_training_arguments(parser: argparse.ArgumentParser, *, steps: bool) -> None:
    defaults = Recipe()
    if steps:
        parser.add_argument("--steps", type=int, default=defaults.steps,
                            help=f"fine-tuning steps, whatever the number of labels (default {defaults.steps})")
        parser.add_argument("--layer-decay", type=float, default=defaults.layer_decay,
                            help=f"layer-wise lr decay of a pretrained body (1: off; default {defaults.layer_decay})")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help=f"peak learning rate (not scaled with the batch; default {defaults.lr})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"batch size (default {defaults.batch_size})")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help=f"labelled images held out to select the step (default {defaults.val_fraction}; 0: "
                             f"keep the last step)")
    parser.add_argument("--flips", action=argparse.BooleanOptionalAction, default=defaults.flips,
                        help="random horizontal/vertical flips (off by default: laterality and orientation can carry "
                             "the label)")
    parser.add_argument("--refit-head", action=argparse.BooleanOptionalAction, default=defaults.refit_head,
                        help="after selecting the step, refit the linear head on every labelled image, the held-out "
                             "ones included (default on)")


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a GPU when available), cpu, cuda or cuda:N")
    parser.add_argument("--out", default=None, help="folder to write the results JSON into")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser, pretrained=True)
    _add_data_arguments(parser)
    parser.add_argument("--domain", choices=DOMAINS, default=None,
                        help="plain (default): the decrypted model on plain images; encrypted: the model as "
                             "pretrained, on images the classifier encrypts with the key (image mode)")
    _add_training_arguments(parser, steps=True)
    _add_common_arguments(parser)


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser, pretrained=True)
    _add_data_arguments(parser)
    parser.add_argument("--k", type=int, default=None,
                        help="neighbours of the k-NN classifier (default: sqrt of the labelled images, at most 20); "
                             "a k above the number of labelled images is clamped to it, and the k used is printed "
                             "and written")
    _add_common_arguments(parser)


def add_fedavg_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FedAvgSettings()
    _add_model_arguments(parser, pretrained=False)
    _add_data_arguments(parser)
    parser.add_argument("--clients", type=int, required=True, help="number of simulated clients")
    parser.add_argument("--alpha", type=float, default=None,
                        help="non-IID: Dirichlet concentration over classes (default IID)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help=f"communication rounds (default {defaults.rounds})")
    parser.add_argument("--local-steps", type=int, default=defaults.local_steps,
                        help=f"local optimisation steps per round (default {defaults.local_steps})")
    parser.add_argument("--client-fraction", type=float, default=defaults.client_fraction,
                        help=f"fraction of clients sampled per round (default {defaults.client_fraction})")
    _add_training_arguments(parser, steps=False)
    _add_common_arguments(parser)


# ---- building blocks -----------------------------------------------------------------------------------------------

def _init(args: argparse.Namespace) -> str:
    """``pretrained`` or ``random`` after checking that the model flags fit together (``fedavg`` has no ``--init``:
    its ``--model`` only names the architecture)."""
    if hasattr(args, "init"):
        init = args.init or ("pretrained" if args.model is not None else "random")
    else:
        init = "random"
    given = [name for name in ("arch", *ARCH_FLAGS) if getattr(args, name) is not None]
    if args.model is not None and given:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag}: the architecture comes from --model {args.model}; drop {flag}")
    if init == "pretrained":
        if args.model is None:
            raise ValueError("--model: --init pretrained needs an exported backbone (or use --init random --arch ...)")
        if args.key is None:
            raise ValueError("--key: a pretrained backbone needs the consortium key it was pretrained with")
    if getattr(args, "domain", None) == "encrypted" and init != "pretrained":
        raise ValueError("--domain encrypted: only a pretrained backbone has an encrypted domain")
    return init


def _fraction(value: float, flag: str, *, closed: bool) -> float:
    if not (0 < value <= 1 if closed else 0 < value < 1):
        raise ValueError(f"{flag} must be in (0, {'1]' if closed else '1)'}, got {value}")
    return value


def load_labelled_data(args: argparse.Namespace, metadata: Optional[dict]) -> tuple[ImageSet, ImageSet, dict]:
    """``(train set, test set, info)``: ``--data`` split by ``--test-fraction`` (stratified, ``--seed``) or ``--data``
    and ``--test-data``, resized/converted to the exported model's geometry by default (``metadata``, or None).
    ``--label-fraction`` is not applied here. ``info`` describes the data for the report and the JSON."""
    size, channels = check_image_size(args.image_size, "--image-size"), args.channels
    if metadata is not None:
        size = size if size is not None else tuple(metadata["image_size"])
        channels = channels if channels is not None else metadata["channels"]
    data = load_dataset(args.data, size=size, channels=channels, split=args.split)
    if data.labels is None:
        raise DataError(f"--data {args.data}: has no labels (supervised evaluation needs class sub-folders, a "
                        "labelled .npz, --data images.npy with labels or a .csv manifest with a label column)")
    if args.test_data is not None:
        test = load_dataset(args.test_data, size=data.geometry[1:], channels=data.channels, split=args.test_split)
        if test.labels is None:
            raise DataError(f"--test-data {args.test_data}: has no labels")
        if data.class_names is not None and test.class_names is not None and data.class_names != test.class_names:
            raise DataError(f"--test-data {args.test_data}: its classes {test.class_names} are not those of --data "
                            f"{data.class_names}; labels would not correspond")
        shared = (set() if data.patient_ids is None or test.patient_ids is None else
                  (set(data.patient_ids) & set(test.patient_ids)) - {""})
        if shared:  # counted, never listed: patient IDs stay out of messages and logs
            raise DataError(f"--test-data {args.test_data}: {len(shared)} patients also have images in --data; a "
                            "held-out set must not share patients with the training data")
        train = data
        held_out = f"{args.test_data} [{args.test_split}]"
    else:
        fraction = _fraction(DEFAULT_TEST_FRACTION if args.test_fraction is None else args.test_fraction,
                             "--test-fraction", closed=False)
        train_rows, test_rows = train_test_split(data.labels, fraction, seed=args.seed, groups=data.groups)
        train, test = data.subset(train_rows), data.subset(test_rows)
        held_out = f"{fraction:g} of --data" + (" (patient-level)" if data.groups is not None else "")
    if metadata is not None:
        expected = (metadata["channels"], *metadata["image_size"])
        if train.geometry != expected:
            raise DataError(f"--data: images are {'x'.join(map(str, train.geometry))} but --model {args.model} takes "
                            f"{'x'.join(map(str, expected))}; drop --image-size/--channels or pass the model's")
    n_classes = max(data.n_classes, test.n_classes)
    info = {"data": data.description, "held_out": held_out, "n_train": len(train), "n_test": len(test),
            "geometry": list(train.geometry), "n_classes": n_classes, "class_names": data.class_names}
    return train, test, info


def labelled_fraction(images: ImageSet, fraction: float, seed: int) -> ImageSet:
    """A stratified ``fraction`` of ``images`` (every class kept; all of them when ``fraction`` is 1)."""
    _fraction(fraction, "--label-fraction", closed=True)
    return images if fraction == 1 else images.subset(label_fraction_subset(images.labels, fraction, seed=seed))


def _architecture(args: argparse.Namespace, metadata: Optional[dict], geometry: tuple[int, int, int]) -> dict:
    """The random-init network: the exported model's, or ``--arch`` and the overrides for this geometry."""
    if metadata is not None:
        return exported_architecture(metadata)
    patch_size = DEFAULT_PATCH_SIZE if args.patch_size is None else args.patch_size
    check_patch_size(geometry, patch_size)
    overrides = {name: getattr(args, name) for name in ("depth", "embed_dim", "num_heads")
                 if getattr(args, name) is not None}
    return dict(arch=args.arch or DEFAULT_ARCH, image_size=tuple(geometry[1:]), patch_size=patch_size,
                in_chans=geometry[0], **overrides)


def _split(train: ImageSet, test: ImageSet, n_classes: int) -> LabelledSplit:
    return LabelledSplit(train.to_tensor(), train.labels, test.to_tensor(), test.labels, n_classes)


def _prepare(args: argparse.Namespace):
    """Everything ``finetune`` and ``probe`` share: the key (read first, so a wrong path fails at once), the data,
    the classifier and a description of the model."""
    init = _init(args)
    metadata = read_export_metadata(args.model) if args.model is not None else None
    domain = getattr(args, "domain", None)
    if domain is not None and init == "pretrained" and metadata["mode"] == "token":
        raise ValueError(f"--domain: {args.model} is a token-mode backbone; its classifier always embeds the images "
                         "with the key-derived token embedder (drop --domain)")
    domain = domain or "plain"
    key = Key.load(args.key) if init == "pretrained" else None
    _fraction(args.label_fraction, "--label-fraction", closed=True)
    train, test, info = load_labelled_data(args, metadata)
    train = labelled_fraction(train, args.label_fraction, args.seed)
    info.update(n_train=len(train), label_fraction=args.label_fraction)
    split = _split(train, test, info["n_classes"])
    random_arch = None if init == "pretrained" else _architecture(args, metadata, train.geometry)
    classifier = build_classifier(split, model=args.model if init == "pretrained" else None, key=key, domain=domain,
                                  random_arch=random_arch, seed=args.seed)
    if init == "pretrained":
        model = {"init": "pretrained", "path": args.model, "arch": metadata["arch"], "mode": metadata["mode"],
                 "domain": None if metadata["mode"] == "token" else domain,
                 "key_fingerprint": key.fingerprint, "pretrain_epochs": metadata["epochs"]}
    else:
        model = {"init": "random", "architecture_from": args.model, **random_arch,
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


def _finish(args: argparse.Namespace, name: str, results: dict) -> None:
    if args.out is not None:
        print(f"wrote {write_results(args.out, name, results)}")


# ---- commands ------------------------------------------------------------------------------------------------------

def _recipe(args: argparse.Namespace, **changes) -> Recipe:
    """The shared recipe from the flags (its checks name the setting; the CLI's handler reports it as the flag)."""
    return Recipe(lr=args.lr, batch_size=args.batch_size, val_fraction=args.val_fraction, flips=args.flips,
                  refit_head=args.refit_head, seed=args.seed, **changes)


def run_finetune(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    device = resolve_device(args.device)
    recipe = _recipe(args, steps=args.steps, layer_decay=args.layer_decay)
    classifier, split, info, model = _prepare(args)
    metrics = finetune_and_evaluate(classifier, split, recipe, device=device, pretrained=model.get("init") != "random")
    print(f"fine-tuned {_describe_model(model)} for {recipe.steps} steps (selected step {metrics['selected_step']} on "
          f"{metrics['n_val']} held-out labelled images) on {info['n_train']} labelled images of "
          f"{info['data']} ({info['n_classes']} classes, label fraction {info['label_fraction']:g}); held-out "
          f"{info['held_out']}: {info['n_test']} images")
    _print_metrics(metrics)
    _print_confusion(metrics["confusion_matrix"], info["class_names"])
    _finish(args, "finetune.json", {"command": "finetune", "model": model, "data": info,
                                    "recipe": dataclasses.asdict(recipe), "device": str(device), "metrics": metrics,
                                    "seconds": time.perf_counter() - started})
    return 0


def run_probe(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    device = resolve_device(args.device)
    classifier, split, info, model = _prepare(args)
    k = min(args.k or default_k(len(split.train_labels)), len(split.train_labels))
    if args.k is not None and args.k > k:
        print(f"--k {args.k} is more than the {k} labelled training images: using k = {k}")
    metrics = probe(classifier, split, device=device, k=k)
    print(f"frozen features of {_describe_model(model)}: {info['n_train']} training images of {info['data']} "
          f"({info['n_classes']} classes, label fraction {info['label_fraction']:g}); held-out {info['held_out']}: "
          f"{info['n_test']} images")
    for name, title in (("knn", f"k-NN (k = {k}, cosine of centred features)"), ("linear", "linear probe")):
        print(f"  {title}:")
        _print_metrics(metrics[name], indent="    ")
        _print_confusion(metrics[name]["confusion_matrix"], info["class_names"], indent="    ")
    _finish(args, "probe.json", {"command": "probe", "model": model, "data": info, "k": k,
                                 "device": str(device), "metrics": metrics,
                                 "seconds": time.perf_counter() - started})
    return 0


def run_fedavg(args: argparse.Namespace) -> int:
    if isinstance(args.clients, bool) or args.clients < 1:
        raise ValueError(f"--clients must be a positive integer, got {args.clients}")
    started = time.perf_counter()
    device = resolve_device(args.device)
    _init(args)
    settings = FedAvgSettings(rounds=args.rounds, local_steps=args.local_steps,
                              client_fraction=args.client_fraction, seed=args.seed)
    recipe = _recipe(args, steps=args.rounds * args.local_steps)
    metadata = read_export_metadata(args.model) if args.model is not None else None
    _fraction(args.label_fraction, "--label-fraction", closed=True)
    train, test, info = load_labelled_data(args, metadata)
    random_arch = _architecture(args, metadata, train.geometry)
    test_images = test.to_tensor()
    splits = []
    for c, rows in enumerate(split_clients(train.labels, args.clients, alpha=args.alpha, seed=args.seed,
                                           groups=train.groups)):
        client = labelled_fraction(train.subset(rows), args.label_fraction, args.seed + c)
        splits.append(LabelledSplit(client.to_tensor(), client.labels, test_images, test.labels, info["n_classes"]))
    info.update(n_train=sum(len(s.train_labels) for s in splits), label_fraction=args.label_fraction,
                clients=[len(s.train_labels) for s in splits], alpha=args.alpha)

    from tqdm.auto import tqdm

    with tqdm(total=settings.rounds, desc="fedavg", unit="round", file=sys.stderr, disable=None,
              dynamic_ncols=True) as bar:
        metrics, traffic = fedavg_baseline(splits, random_arch, recipe, settings, device=device,
                                           on_round=lambda _: bar.update(1))
    model_bytes = state_dict_bytes(build_classifier(splits[0], model=None, key=None, random_arch=random_arch,
                                                    seed=args.seed))
    model = {"init": "random", "architecture_from": args.model, **random_arch,
             "image_size": list(random_arch["image_size"])}
    print(f"FedAvg: {_describe_model(model)}, {args.clients} clients "
          f"({'IID' if args.alpha is None else f'Dirichlet alpha {args.alpha:g}'}; labelled images per client "
          f"{info['clients']}), {settings.rounds} rounds x {settings.local_steps} local steps, client fraction "
          f"{settings.client_fraction:g}; held-out {info['held_out']}: {info['n_test']} images")
    _print_metrics(metrics)
    _print_confusion(metrics["confusion_matrix"], info["class_names"])
    print(f"  communication per client: upload {human_bytes(traffic.upload_bytes)} ({traffic.upload_bytes:,} bytes), "
          f"download {human_bytes(traffic.download_bytes)} ({traffic.download_bytes:,} bytes) over {traffic.rounds} "
          f"rounds; model {human_bytes(model_bytes)} ({model_bytes:,} bytes) per transfer")
    _finish(args, "fedavg.json", {"command": "fedavg", "model": model, "data": info,
                                  "settings": dataclasses.asdict(settings), "recipe": dataclasses.asdict(recipe),
                                  "device": str(device), "metrics": metrics,
                                  "communication": {**dataclasses.asdict(traffic), "model_bytes": model_bytes},
                                  "seconds": time.perf_counter() - started})
    return 0
