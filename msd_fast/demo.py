"""``msd-fast demo``: the single-round pipeline and both baselines on simulated clients, end to end.

keygen -> each client encodes its images once (a shard) -> the server pretrains on the shards (never the key) ->
export -> each client decrypts the model exactly and fine-tunes it on a small labelled fraction of its images.
Baselines with the same supervised budget: fine-tuning only (the same network from random init, same recipe and
epochs) and supervised FedAvg over the same clients (rounds x local epochs = the fine-tuning epochs). Everything is
scored on one held-out test set; communication is counted from the actual payloads (shard files, exported model,
serialised FedAvg weights).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np
import torch

from .atomic import atomic_write, save_figure, write_text
from .client import encode_dataset
from .flags import flag
from .data import ImageSet, label_fraction_subset, load_dataset, split_clients, train_test_split
from .downstream import (FedAvgSettings, LabelledSplit, Recipe, build_classifier, fedavg_baseline,
                         finetune_and_evaluate, probe)
from .downstream.communication import Communication, file_bytes, human_bytes
from .keys import Key
from .pretrain import PretrainConfig, export_backbone, pretrain
from .pretrain.logs import plot_loss_curve


@dataclasses.dataclass
class DemoConfig:
    out: str = flag("demo_out", "report folder (also holds the demo's key, shards, checkpoint and model)")
    data: str = flag("synthetic:2400", "labelled data: synthetic[:N], an image folder with class sub-folders, a "
                                     "MedMNIST .npz or a .npy")
    image_size: Optional[int] = flag(None, "resize images to this side")
    clients: int = flag(3, "simulated clients")
    alpha: Optional[float] = flag(None, "Dirichlet concentration of a non-IID split (default: IID)")
    test_fraction: float = flag(0.25, "held-out test fraction")
    label_fraction: float = flag(0.1, "fraction of each client's images with labels for fine-tuning")
    patch_size: int = flag(8, "ViT patch size (= encryption block size)")
    arch: str = flag("vit_tiny_patch16_224", "timm ViT name")
    depth: int = flag(4, "ViT depth")
    embed_dim: int = flag(96, "ViT width")
    num_heads: int = flag(3, "attention heads")
    out_dim: int = flag(256, "DINO head output size")
    epochs: int = flag(10, "pretraining epochs")
    pretrain_lr: float = flag(4e-3, "pretraining peak lr at batch 256 (scaled to batch 64)")
    finetune_epochs: int = flag(30, "fine-tuning epochs (FedAvg: rounds x local epochs = this)")
    finetune_lr: float = flag(2e-3, "fine-tuning peak lr at batch 256")
    local_epochs: int = flag(2, "FedAvg local epochs per round")
    negpos: bool = flag(True, "negative-positive transform in the encryption")
    seed: int = flag(0, "seed of splits, training and views")
    device: str = flag("auto", "auto (GPU when available), cpu or cuda")
    progress: bool = flag(True, "progress bars on terminals")

    @classmethod
    def fast(cls, **changes) -> "DemoConfig":
        """A smoke-test configuration (about a minute on two CPU cores)."""
        small = dict(data="synthetic:360", image_size=32, depth=1, embed_dim=48, num_heads=3, out_dim=64,
                     epochs=2, finetune_epochs=4, local_epochs=2, label_fraction=0.3)
        return cls(**(small | changes))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


class Demo:
    """One demo run; :meth:`run` returns the results dictionary and writes the report folder."""

    STAGES = ("data", "keygen", "encode", "pretrain", "export", "fine-tune", "fedavg", "report")

    def __init__(self, config: DemoConfig):
        self.config, self.device = config, _device(config.device)
        self.bar = None

    def stage(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"demo: {name}")
            self.bar.update(0 if name == self.STAGES[0] else 1)
        print(f"[demo] {name}", flush=True)

    def run(self) -> dict:
        config = self.config
        os.makedirs(config.out, exist_ok=True)
        if config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.STAGES) - 1, disable=None, dynamic_ncols=True)
        started = time.perf_counter()
        self.stage("data")
        images, labels, splits, client_sets = self.prepare_data()
        self.stage("keygen")
        key = self.consortium_key()
        self.stage("encode")
        shard_paths = self.encode(client_sets, key)
        self.stage("pretrain")
        pretrain_summary = pretrain(self.pretrain_config(shard_paths))
        self.stage("export")
        model_path = os.path.join(config.out, "model.safetensors")
        export_backbone(os.path.join(config.out, "pretrain", "checkpoint.pt"), model_path, overwrite=True)
        self.stage("fine-tune")
        per_client = self.finetune(splits, model_path, key)
        self.stage("fedavg")
        fed_metrics, fed_traffic = fedavg_baseline(
            splits, self.random_arch(), self.recipe(),
            FedAvgSettings(rounds=max(1, config.finetune_epochs // config.local_epochs),
                           local_epochs=config.local_epochs, seed=config.seed), device=self.device)
        self.stage("report")
        ours = Communication(upload_bytes=int(np.mean([file_bytes(p) for p in shard_paths])),
                             download_bytes=file_bytes(model_path), rounds=1)
        results = self.results(per_client, fed_metrics, fed_traffic, ours, pretrain_summary,
                               time.perf_counter() - started)
        self.write_report(results, images, key)
        if self.bar is not None:
            self.bar.close()
        return results

    # ---- stages ---------------------------------------------------------------------------------------------------
    def prepare_data(self):
        config = self.config
        size = (config.image_size, config.image_size) if config.image_size else None
        dataset = load_dataset(config.data, size=size)
        if dataset.labels is None:
            raise ValueError(f"data: the demo needs labelled images, {config.data!r} has no labels")
        images, labels = dataset.to_tensor(), dataset.labels
        self._channels, self._image_size = images.shape[1], tuple(images.shape[2:])
        train, test = train_test_split(labels, config.test_fraction, seed=config.seed)
        n_classes = int(labels.max()) + 1
        splits, client_sets = [], []
        for c, rows in enumerate(split_clients(labels[train], config.clients, alpha=config.alpha, seed=config.seed)):
            mine = train[rows]
            client_sets.append(ImageSet(images[mine], labels[mine], dataset.class_names))
            labelled = mine[label_fraction_subset(labels[mine], config.label_fraction, seed=config.seed + c)]
            splits.append(LabelledSplit(images[labelled], labels[labelled], images[test], labels[test], n_classes))
        return images, labels, splits, client_sets

    def consortium_key(self) -> Key:
        path = os.path.join(self.config.out, "consortium.key")
        if os.path.exists(path):  # a rerun keeps the demo's key: nothing the user has is replaced
            return Key.load(path)
        key = Key.generate()
        key.save(path)
        return key

    def encode(self, client_sets: list[ImageSet], key: Key) -> list[str]:
        folder = os.path.join(self.config.out, "shards")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for c, client in enumerate(client_sets):
            path = os.path.join(folder, f"client{c}.shard")
            encode_dataset(client, key, path, patch_size=self.config.patch_size, negpos=self.config.negpos,
                           client=f"client{c}", overwrite=True, progress=False)
            paths.append(path)
        return paths

    def pretrain_config(self, shard_paths: list[str]) -> PretrainConfig:
        config = self.config
        return PretrainConfig(shards=shard_paths, out=os.path.join(config.out, "pretrain"), arch=config.arch,
                              depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads,
                              drop_path=0.0, out_dim=config.out_dim, head_hidden_dim=512, head_bottleneck_dim=128,
                              local_views=4, epochs=config.epochs, batch_size=64, lr=config.pretrain_lr,
                              warmup_epochs=max(1, config.epochs // 10), momentum_teacher=0.99,
                              seed=config.seed, device=str(self.device) if self.device.type == "cpu" else "auto",
                              progress=config.progress)

    def random_arch(self) -> dict:
        config = self.config
        return dict(arch=config.arch, depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads,
                    patch_size=config.patch_size, in_chans=self._channels, image_size=self._image_size)

    def recipe(self) -> Recipe:
        return Recipe(epochs=self.config.finetune_epochs, lr=self.config.finetune_lr, seed=self.config.seed)

    def finetune(self, splits: list[LabelledSplit], model_path: str, key: Key) -> dict:
        results = {"ms_dino": [], "random": [], "knn_ms_dino": [], "knn_random": []}
        for c, split in enumerate(splits):
            for name, model in (("ms_dino", model_path), ("random", None)):
                classifier = build_classifier(split, model=model, key=key, random_arch=self.random_arch(),
                                              seed=self.config.seed + c)
                results["knn_" + name].append(probe(classifier, split, device=self.device)["knn"])
                results[name].append(finetune_and_evaluate(classifier, split, self.recipe(), device=self.device))
        return results

    # ---- results and report ---------------------------------------------------------------------------------------
    def results(self, per_client: dict, fed_metrics: dict, fed_traffic: Communication, ours: Communication,
                pretrain_summary: dict, seconds: float) -> dict:
        def row(method: str, metrics: list[dict], knn: Optional[list[dict]], traffic: Communication) -> dict:
            out = {"method": method, "upload_bytes": traffic.upload_bytes, "download_bytes": traffic.download_bytes,
                   "rounds": traffic.rounds}
            for name in ("accuracy", "balanced_accuracy", "macro_auc"):
                out[name], out[name + "_std"] = _mean_std([m[name] for m in metrics])
            out["knn_accuracy"] = _mean_std([m["accuracy"] for m in knn])[0] if knn else None
            return out

        config = self.config
        rounds = max(1, config.finetune_epochs // config.local_epochs)
        rows = [row("MS-DINO (ours): encrypt once, pretrain, fine-tune", per_client["ms_dino"],
                    per_client["knn_ms_dino"], ours),
                row("Fine-tuning only (random init)", per_client["random"], per_client["knn_random"],
                    Communication(0, 0, 0)),
                row(f"FedAvg (supervised, {rounds} rounds x {config.local_epochs} local epochs)", [fed_metrics],
                    None, fed_traffic)]
        return {"config": dataclasses.asdict(config), "rows": rows, "per_client": per_client,
                "fedavg": fed_metrics, "pretrain_history": pretrain_summary["history"], "seconds": seconds,
                "device": str(self.device)}

    def write_report(self, results: dict, images: torch.Tensor, key: Key) -> None:
        out = self.config.out
        rows = results["rows"]
        lines = [f"# msd-fast demo ({self.config.clients} clients, label fraction {self.config.label_fraction}, "
                 f"seed {self.config.seed}, {results['device']}, {results['seconds'] / 60:.1f} min)", "",
                 "| method | accuracy | balanced acc. | macro AUC | k-NN acc. | upload / client | download / client "
                 "| rounds |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            knn = f"{r['knn_accuracy']:.3f}" if r["knn_accuracy"] is not None else "-"
            lines.append(f"| {r['method']} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                         f"{r['balanced_accuracy']:.3f} | {r['macro_auc']:.3f} | {knn} | "
                         f"{human_bytes(r['upload_bytes'])} | {human_bytes(r['download_bytes'])} | {r['rounds']} |")
        lines += ["", "Accuracy: mean ± std over the clients (each fine-tunes on its own labelled images; FedAvg has "
                  "one global model). All methods are scored on the same held-out test set."]
        table = "\n".join(lines) + "\n"
        write_text(os.path.join(out, "results.md"), table)
        fields = ["method", "accuracy", "accuracy_std", "balanced_accuracy", "macro_auc", "knn_accuracy",
                  "upload_bytes", "download_bytes", "rounds"]
        with atomic_write(os.path.join(out, "results.csv"), "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
        plot_loss_curve(os.path.join(out, "pretrain", "log.jsonl"), os.path.join(out, "loss_curve.png"))
        self.plot_accuracy_vs_communication(rows, os.path.join(out, "accuracy_vs_communication.png"))
        self.plot_samples(images, key, os.path.join(out, "samples.png"))
        print(table)

    def plot_accuracy_vs_communication(self, rows: list[dict], path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
        for r, marker in zip(rows, "o^s"):
            megabytes = (r["upload_bytes"] + r["download_bytes"]) / 1e6
            axis.errorbar(megabytes, r["accuracy"], yerr=r["accuracy_std"], fmt=marker, capsize=3,
                          label=f"{r['method'].split(':')[0].split(' (')[0]} ({r['rounds']} rounds)")
        axis.set_xlabel("bytes per client (up + down), MB")
        axis.set_ylabel("test accuracy")
        axis.set_title(f"label fraction {self.config.label_fraction}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        save_figure(figure, path)

    def plot_samples(self, images: torch.Tensor, key: Key, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .ops.patch_encryption import decrypt_patches, encrypt_patches

        picks = images[:4]
        options = dict(negpos=self.config.negpos, max_value=255.0)
        encrypted = encrypt_patches(picks, key, self.config.patch_size, **options)
        decrypted = decrypt_patches(encrypted, key, self.config.patch_size, **options)
        figure, axes = plt.subplots(3, len(picks), figsize=(2 * len(picks), 6.3), dpi=110)
        for row, (title, batch) in enumerate((("plain", picks), ("encrypted (server's view)", encrypted),
                                              ("decrypted (client)", decrypted))):
            for col in range(len(picks)):
                axes[row, col].imshow(batch[col].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0,
                                      vmax=255)
                axes[row, col].axis("off")
            axes[row, 0].set_title(title, loc="left", fontsize=9)
        figure.tight_layout()
        save_figure(figure, path)


def run_demo(config: DemoConfig) -> dict:
    """Run the demo (see the module docstring); returns the results and writes ``config.out``."""
    return Demo(config).run()


def add_demo_arguments(parser) -> None:
    from .flags import add_dataclass_arguments

    add_dataclass_arguments(parser, DemoConfig)
    parser.add_argument("--fast", action="store_true", help="smoke-test sizes (about a minute on a CPU); explicit "
                                                             "flags are ignored")


def run_demo_command(args) -> int:
    from .flags import dataclass_from_args

    config = dataclass_from_args(DemoConfig, args)
    if args.fast:
        config = DemoConfig.fast(out=config.out, seed=config.seed, device=config.device, progress=config.progress)
    run_demo(config)
    return 0
