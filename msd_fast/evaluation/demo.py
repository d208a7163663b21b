"""``msd-fast demo``: the single-round pipeline and its baselines on simulated clients, over several seeds.

Per seed: split the data (held-out test set, clients), keygen (one consortium key per report folder), each client
encodes its images once (a shard) -> the server pretrains on the shards (never the key; a k-NN monitor and collapse
signals are logged every epoch) -> export -> each client decrypts the model exactly and, for every label fraction,
fine-tunes it on its labelled images with the shared recipe (:mod:`msd_fast.client.finetune`: fixed steps,
warm-up, layer-wise decay, label smoothing, selection on a validation split the client holds).

Compared at the same labels and the same optimisation steps: fine-tuning only (the same network from random init),
supervised FedAvg over the same clients (rounds x local steps = the fine-tuning steps), the frozen features of both
networks (k-NN and linear probe), a raw-pixel k-NN (the floor) and supervised training on all labels of all clients
pooled (the upper bound), and with ``--fedavg-dino`` the self-supervised federated baseline
(:mod:`msd_fast.evaluation.fedavg_dino`: the same masked-sampling DINO run by the clients on their plain images,
weights averaged every round) followed by the same fine-tuning. Everything is scored on one held-out test set per
seed, which is never used to select anything; communication is counted from the actual payloads. Results are
mean ± std over seeds of the mean over clients. The first seed's decrypted MS-DINO model is also written as a timm hub folder (``timm_model/``, see
:mod:`msd_fast.client.timm_export`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import numpy as np
import torch

from ..checks import resolve_device
from ..client.encode import encode_dataset, warn_if_weak
from ..data import ImageSet, label_fraction_subset, load_dataset, split_clients, train_test_split
from ..data.convert import check_image_size
from ..client import Recipe
from . import FedAvgSettings, LabelledSplit, build_classifier, fedavg_baseline, finetune_and_evaluate, probe
from .communication import Communication, file_bytes
from .metrics import classification_metrics
from .probe import knn_probabilities
from ..protocol.encryption import CIPHER_DTYPES, SCHEMES, EncryptionSpec
from ..cli.flags import flag
from ..keys import Key
from ..server import PretrainConfig, export_backbone, pretrain
from ..client.finetune import standardisation
from ..client.timm_export import export_timm
from .fedavg_dino import FedAvgDINOSettings, fedavg_dino, fedavg_dino_classifier
from ..protocol.shards import open_shard



@dataclasses.dataclass
class DemoConfig:
    out: str = flag("demo_out", "report folder (also holds the demo's key, shards, checkpoints and models)")
    data: str = flag("synthetic:2400", "labelled data: synthetic[:N], an image folder with class sub-folders, a "
                                     "MedMNIST .npz or a .npy")
    image_size: Optional[int] = flag(None, "resize images to this side (synthetic: generated at this side, "
                                           "default 32)")
    clients: int = flag(3, "simulated clients")
    alpha: Optional[float] = flag(None, "Dirichlet concentration of a non-IID split (default: IID)")
    test_fraction: float = flag(0.25, "held-out test fraction")
    label_fractions: str = flag("0.1", "comma-separated fractions of each client's images with labels, e.g. "
                                       "0.01,0.1,1 (one table block and one point of the sweep plot each)")
    seeds: int = flag(3, "seeds (splits, pretraining, fine-tuning); results are mean ± std over them")
    seed: int = flag(0, "first seed")
    patch_size: int = flag(8, "ViT patch size (= encryption block size)")
    arch: str = flag("vit_tiny_patch16_224", "timm ViT name")
    depth: int = flag(4, "ViT depth")
    embed_dim: int = flag(96, "ViT width")
    num_heads: int = flag(3, "attention heads")
    out_dim: int = flag(256, "DINO head output size")
    epochs: int = flag(20, "pretraining epochs")
    pretrain_batch_size: int = flag(32, "pretraining batch size (small data needs updates more than large batches)")
    pretrain_lr: float = flag(4e-3, "pretraining peak lr at batch 256 (scaled linearly to the batch size)")
    teacher_views: str = flag("all", "what the teacher sees: all tokens (MSN-style) or the global views (DINO)",
                              choices=("all", "global"))
    global_keep: float = flag(0.6, "fraction of tokens each of the 2 global student views keeps")
    local_views: int = flag(4, "local student views")
    local_keep: float = flag(0.25, "fraction of tokens a local view keeps")
    embed_optimizer: str = flag("rowwise", "pretraining: second moment of the patch-embedding weight, rowwise "
                                           "(key-invariant) or adamw", choices=("rowwise", "adamw"))
    contrast: float = flag(0.0, "student inputs: random contrast about mid-grey, factor in [1-c, 1+c]")
    noise: float = flag(0.0, "student inputs: Gaussian noise std as a fraction of the value range")
    finetune_steps: int = flag(300, "fine-tuning steps (every method; FedAvg: rounds x local steps)")
    finetune_lr: float = flag(1e-3, "fine-tuning peak learning rate")
    layer_decay: float = flag(0.75, "layer-wise lr decay of pretrained bodies in fine-tuning (1: off)")
    refit_head: bool = flag(True, "after selecting the step, refit the linear head on all of a client's labels")
    fedavg_rounds: int = flag(15, "FedAvg rounds (local steps = fine-tuning steps / rounds)")
    upper_bound_steps: int = flag(1500, "steps of the all-labels supervised upper bound")
    scheme: str = flag("dense", "encryption: dense (the key's orthogonal block transform) or permute (block + "
                                "pixel shuffling + negative-positive, broken by the audit; for comparison)",
                       choices=SCHEMES)
    per_sample: bool = flag(True, "a different block order for every image (--no-per-sample: one key-wide order)")
    cipher_dtype: str = flag("float16", "dense ciphertext storage type", choices=sorted(CIPHER_DTYPES))
    audit: bool = flag(True, "run the quick privacy audit on the configuration used (about a minute)")
    device: str = flag("auto", "auto (GPU when available), cpu or cuda")
    workers: int = flag(0, "seeds run in parallel processes (0: auto = every seed at once, up to twice the CPU "
                           "cores, on a CPU; 1 on a GPU)")
    progress: bool = flag(True, "progress bars on terminals")
    fedavg_dino: bool = flag(False, "add the FedAvg-DINO row: the same masked-sampling DINO run by the clients on "
                                    "their plain images, --epochs rounds of one local epoch, weights averaged "
                                    "(doubles the pretraining time)")

    def __post_init__(self):
        self.fractions()  # validates
        self.encryption()
        for name in ("clients", "seeds", "epochs", "finetune_steps", "fedavg_rounds", "upper_bound_steps",
                     "patch_size", "depth", "embed_dim", "num_heads", "out_dim", "pretrain_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.finetune_steps < self.fedavg_rounds:
            raise ValueError(f"--finetune-steps ({self.finetune_steps}) must be >= --fedavg-rounds "
                             f"({self.fedavg_rounds})")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        for name in ("pretrain_lr", "finetune_lr"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(self, name)}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"--workers must be an integer >= 0, got {self.workers!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"--alpha must be > 0, got {self.alpha}")
        if self.image_size is not None:
            check_image_size(self.image_size, "--image-size")

    def encryption(self) -> EncryptionSpec:
        """The clients' :class:`~msd_fast.protocol.encryption.EncryptionSpec` (the permute scheme with pixel shuffling and
        negative-positive)."""
        permute = self.scheme == "permute"
        return EncryptionSpec(scheme=self.scheme, per_sample=self.per_sample, pixel_shuffle=permute, negpos=permute,
                              cipher_dtype=self.cipher_dtype)

    def fractions(self) -> list[float]:
        """The label fractions, in the order given."""
        try:
            values = [float(v) for v in str(self.label_fractions).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--label-fractions must be comma-separated numbers, got {self.label_fractions!r}")
        if not values or any(not 0 < v <= 1 for v in values):
            raise ValueError(f"--label-fractions must be numbers in (0, 1], got {self.label_fractions!r}")
        return values

    @classmethod
    def fast(cls, **changes) -> "DemoConfig":
        """A smoke-test configuration (well under a minute on two CPU cores; its numbers mean nothing)."""
        small = dict(data="synthetic:360", image_size=32, depth=1, embed_dim=48, num_heads=3, out_dim=64, epochs=2,
                     pretrain_batch_size=64,
                     seeds=1, finetune_steps=20, fedavg_rounds=4, upper_bound_steps=20, label_fractions="0.3")
        return cls(**(small | changes))


TIMM_FOLDER = "timm_model"  # the report's timm hub folder: the first seed's decrypted MS-DINO model


@dataclasses.dataclass
class SeedData:
    """One seed's split: every image, the test rows, and each client's training rows."""

    images: torch.Tensor
    labels: torch.Tensor
    test: torch.Tensor
    clients: list[torch.Tensor]
    n_classes: int


class Demo:
    """One demo run; :meth:`run` returns the results dictionary and writes the report folder."""

    def __init__(self, config: DemoConfig):
        self.config, self.device = config, resolve_device(config.device)
        self.bar = None

    # ---- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        from .demo_report import write_report

        config = self.config
        started = time.perf_counter()
        self.check_settings()  # every composed setting, before anything is read or written
        warn_if_weak(config.encryption())
        dataset = self.load_data()  # bad --data fails here, before anything is written
        self.check_sizes(dataset)
        os.makedirs(config.out, exist_ok=True)
        key = self.consortium_key()
        seeds = [config.seed + i for i in range(config.seeds)]
        workers = self.workers(len(seeds))
        if workers > 1:
            per_seed = self.run_parallel(seeds, workers)
        else:
            self.open_bar(len(seeds) * (3 + config.fedavg_dino + len(config.fractions())))
            per_seed = [self.run_seed(dataset, key, seed) for seed in seeds]
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        results = {"config": dataclasses.asdict(config), "seeds": seeds, "per_seed": per_seed,
                   "device": str(self.device), "class_names": list(dataset.class_names or []),
                   "timm_model": TIMM_FOLDER}
        if config.audit:
            self.stage("quick privacy audit")
            results["audit"] = self.quick_audit(self.split(dataset, seeds[0]), key)
        results["seconds"] = time.perf_counter() - started
        write_report(results, dataset, key, config)
        return results

    def workers(self, n_seeds: int) -> int:
        if self.config.workers:
            return min(self.config.workers, n_seeds)
        if self.device.type != "cpu":
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(n_seeds, 2 * cores))  # single-thread processes: more seeds than cores still fill them

    def run_parallel(self, seeds: list[int], workers: int) -> list[dict]:
        """Seeds in ``workers`` spawned processes, each with an equal share of the CPU threads (many small ops
        scale better over processes than over threads); results come back in seed order."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, torch.get_num_threads() // workers)
        print(f"[demo] {len(seeds)} seeds in {workers} processes x {threads} thread(s)", flush=True)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            return list(pool.map(_run_seed_in_worker, [self.config] * len(seeds), seeds))

    def run_seed(self, dataset: ImageSet, key: Key, seed: int) -> dict:
        folder = os.path.join(self.config.out, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        data = self.split(dataset, seed)
        self.stage(f"seed {seed}: encode")
        shards = self.encode(data, key, folder)
        self.stage(f"seed {seed}: pretrain")
        summary = pretrain(self.pretrain_config(shards, folder, seed), monitor=self.knn_monitor(data, shards))
        model_path = os.path.join(folder, "model.safetensors")
        export_backbone(os.path.join(folder, "pretrain", "checkpoint.pt"), model_path, overwrite=True)
        ours = Communication(upload_bytes=int(np.mean([file_bytes(p) for p in shards])),
                             download_bytes=file_bytes(model_path), rounds=1)
        if seed == self.config.seed:  # the first seed's decrypted model, for any timm/PyTorch script
            mean, std = standardisation(data.images[data.clients[0]])  # client 0's own statistics
            export_timm(model_path, key, os.path.join(self.config.out, TIMM_FOLDER), mean=mean, std=std,
                        overwrite=True)
        federated = None
        if self.config.fedavg_dino:
            self.stage(f"seed {seed}: FedAvg-DINO")
            federated = self.fedavg_dino(data, folder, seed)
        self.stage(f"seed {seed}: upper bound")
        upper = self.upper_bound(data, seed)
        fractions = {}
        for fraction in self.config.fractions():
            self.stage(f"seed {seed}: label fraction {fraction:g}")
            fractions[str(fraction)] = self.evaluate_fraction(data, model_path, key, seed, fraction, ours, federated)
        result = {"seed": seed, "pretrain_history": summary["history"], "upper_bound": upper, "fractions": fractions}
        if federated is not None:
            result["fedavg_dino_history"] = federated.history
        return result

    def fedavg_dino(self, data: SeedData, folder: str, seed: int):
        """The FedAvg-DINO baseline on the clients' plain images: MS-DINO's hyperparameters, ``--epochs`` rounds of
        one local epoch each (the same distillation steps per image as the server's pretraining)."""
        config = self.pretrain_config(["<plain images>"], folder, seed)
        sizes = [len(rows) for rows in data.clients]
        local_steps = max(1, round(float(np.mean(sizes)) / config.batch_size))
        settings = FedAvgDINOSettings(rounds=self.config.epochs, local_steps=local_steps,
                                      patch_size=self.config.patch_size, seed=seed)
        return fedavg_dino([data.images[rows] for rows in data.clients], config, settings, device=self.device)

    def quick_audit(self, data: SeedData, key: Key) -> dict:
        """The quick privacy audit (:func:`~msd_fast.evaluation.audit.quick.quick_audit`) of the encryption this run used: the
        server's view of client 0's images (up to 512) is attacked; the other clients' images (up to 256) stand for
        the same-domain public images an attacker may hold."""
        from .audit.quick import quick_audit

        attacked = data.images[data.clients[0][:512]]
        public = data.images[torch.cat(data.clients[1:])[:256]] if len(data.clients) > 1 else None
        spec = self.config.encryption()
        report = quick_audit(attacked, key, spec, self.config.patch_size, public=public, backend="auto")
        return dict(report.to_dict(), encryption=spec.describe(), images=len(attacked))

    # ---- checks (before any work) ----------------------------------------------------------------------------------
    def check_settings(self) -> None:
        """Build the pretraining config, the recipe and the FedAvg settings the run will use, so that their own
        checks refuse a bad value now rather than after the first seed's encoding (messages name the flag)."""
        self.pretrain_config(["<shards>"], self.config.out, self.config.seed)
        self.recipe(self.config.seed)
        self.recipe(self.config.seed, self.config.upper_bound_steps)
        FedAvgSettings(rounds=self.config.fedavg_rounds,
                       local_steps=max(1, self.config.finetune_steps // self.config.fedavg_rounds))

    def check_sizes(self, dataset: ImageSet) -> None:
        """Enough images for the held-out test set, every client and one pretraining batch."""
        config = self.config
        n = len(dataset)
        n_train = n - int(round(config.test_fraction * n))
        if n_train < config.pretrain_batch_size:
            raise ValueError(f"--data: {n} images leave {n_train} for training after the --test-fraction "
                             f"{config.test_fraction:g} test set, fewer than one --pretrain-batch-size "
                             f"({config.pretrain_batch_size})")
        if n_train < 2 * config.clients:
            raise ValueError(f"--data: {n_train} training images cannot be split over --clients {config.clients}")

    # ---- stages ----------------------------------------------------------------------------------------------------
    def load_data(self) -> ImageSet:
        config = self.config
        size = (config.image_size, config.image_size) if config.image_size else None
        if size is None and config.data.startswith("synthetic"):
            size = (32, 32)
        dataset = load_dataset(config.data, size=size)
        if dataset.labels is None:
            raise ValueError(f"--data: the demo needs labelled images, {config.data!r} has no labels")
        H, W = dataset.geometry[1:]
        if H % config.patch_size or W % config.patch_size:
            if size is not None:
                raise ValueError(f"--patch-size {config.patch_size} does not divide --image-size {H}x{W}")
            p = config.patch_size
            size = (-(-H // p) * p, -(-W // p) * p)  # up to the next multiple of the patch size
            print(f"[demo] resizing the {H}x{W} images to {size[0]}x{size[1]} (a multiple of --patch-size {p}; "
                  f"--image-size sets it)", flush=True)
            dataset = load_dataset(config.data, size=size)
        return dataset

    def split(self, dataset: ImageSet, seed: int) -> SeedData:
        config = self.config
        images, labels = dataset.to_tensor(), torch.as_tensor(dataset.labels).long()
        train, test = train_test_split(labels, config.test_fraction, seed=seed)
        clients = [train[rows] for rows in split_clients(labels[train], config.clients, alpha=config.alpha,
                                                          seed=seed)]
        return SeedData(images, labels, test, clients, int(labels.max()) + 1)

    def consortium_key(self) -> Key:
        path = os.path.join(self.config.out, "consortium.key")
        if os.path.exists(path):  # a rerun keeps the demo's key: nothing the user has is replaced
            return Key.load(path)
        key = Key.generate()
        key.save(path)
        return key

    def encode(self, data: SeedData, key: Key, folder: str) -> list[str]:
        os.makedirs(os.path.join(folder, "shards"), exist_ok=True)
        paths = []
        for c, rows in enumerate(data.clients):
            path = os.path.join(folder, "shards", f"client{c}.shard")
            encode_dataset(ImageSet(data.images[rows], data.labels[rows]), key, path,
                           patch_size=self.config.patch_size, encryption=self.config.encryption(),
                           client=f"client{c}", overwrite=True, progress=False)
            paths.append(path)
        return paths

    def pretrain_config(self, shards: list[str], folder: str, seed: int) -> PretrainConfig:
        config = self.config
        return PretrainConfig(
            shards=shards, out=os.path.join(folder, "pretrain"), arch=config.arch, depth=config.depth,
            embed_dim=config.embed_dim, num_heads=config.num_heads, drop_path=0.0, out_dim=config.out_dim,
            head_hidden_dim=512, head_bottleneck_dim=128, global_keep=config.global_keep,
            local_views=config.local_views, local_keep=config.local_keep, teacher_views=config.teacher_views,
            contrast=config.contrast, noise=config.noise, embed_optimizer=config.embed_optimizer,
            epochs=config.epochs, batch_size=config.pretrain_batch_size,
            lr=config.pretrain_lr,
            warmup_epochs=max(1, config.epochs // 10), momentum_teacher=0.99, seed=seed,
            device=str(self.device) if self.device.type == "cpu" else "auto", progress=False)

    def knn_monitor(self, data: SeedData, shards: list[str]):
        """k-NN accuracy of the teacher's features on the encrypted images, read from the shards: client 0's
        images with their labels are the memory bank, the other clients' images the queries (the clients would
        run this on their own labels; the test set is never touched)."""
        encrypted = [open_shard(path)[:] for path in shards]
        labels = [data.labels[rows] for rows in data.clients]
        if len(shards) < 2:  # one client: its first half is the bank
            half = len(labels[0]) // 2
            encrypted, labels = [encrypted[0][:half], encrypted[0][half:]], [labels[0][:half], labels[0][half:]]

        def monitor(teacher, epoch: int) -> dict:
            with torch.no_grad():
                features = [torch.cat([teacher.features(chunk.to(self.device)).float().cpu()
                                       for chunk in part.split(256)]) for part in encrypted]
            scores = knn_probabilities(features[0], labels[0], torch.cat(features[1:]), data.n_classes)
            return {"monitor_knn": float((scores.argmax(1) == torch.cat(labels[1:])).float().mean())}
        return monitor

    def random_arch(self, data: SeedData) -> dict:
        config = self.config
        return dict(arch=config.arch, depth=config.depth, embed_dim=config.embed_dim, num_heads=config.num_heads,
                    patch_size=config.patch_size, in_chans=data.images.shape[1],
                    image_size=tuple(data.images.shape[2:]))

    def recipe(self, seed: int, steps: Optional[int] = None) -> Recipe:
        config = self.config
        steps = steps or config.finetune_steps
        return Recipe(steps=steps, lr=config.finetune_lr, layer_decay=config.layer_decay,
                      refit_head=config.refit_head, seed=seed)

    def labelled_splits(self, data: SeedData, seed: int, fraction: float) -> list[LabelledSplit]:
        splits = []
        for c, rows in enumerate(data.clients):
            picked = rows[label_fraction_subset(data.labels[rows], fraction, seed=seed * 1009 + c)]
            splits.append(LabelledSplit(data.images[picked], data.labels[picked], data.images[data.test],
                                        data.labels[data.test], data.n_classes))
        return splits

    def evaluate_fraction(self, data: SeedData, model_path: str, key: Key, seed: int, fraction: float,
                          ours: Communication, federated=None) -> dict:
        """Every method at one label fraction: per-client metrics (fine-tuning, probes, pixel floor), FedAvg and,
        with ``federated`` (a :class:`~msd_fast.evaluation.fedavg_dino.FedAvgDINOResult`), FedAvg-DINO."""
        splits = self.labelled_splits(data, seed, fraction)
        pretrained = ["ms_dino"] + (["fedavg_dino"] if federated is not None else [])
        names = pretrained + ["random"]
        per_client = {name: [] for name in names + [f"{probe}_{name}" for probe in ("knn", "linear")
                                                    for name in names] + ["pixel_knn"]}
        for c, split in enumerate(splits):
            for name in names:
                if name == "fedavg_dino":
                    classifier = fedavg_dino_classifier(federated.teacher, split.n_classes, seed=seed * 1009 + c)
                else:
                    classifier = build_classifier(split, model=model_path if name == "ms_dino" else None, key=key,
                                                  random_arch=self.random_arch(data), seed=seed * 1009 + c)
                probes = probe(classifier, split, device=self.device)
                per_client["knn_" + name].append(probes["knn"])
                per_client["linear_" + name].append(probes["linear"])
                per_client[name].append(finetune_and_evaluate(classifier, split, self.recipe(seed * 1009 + c),
                                                              device=self.device, pretrained=name in pretrained))
            per_client["pixel_knn"].append(pixel_knn(split))
        rounds = self.config.fedavg_rounds
        fed_metrics, fed_traffic = fedavg_baseline(
            splits, self.random_arch(data), self.recipe(seed),
            FedAvgSettings(rounds=rounds, local_steps=max(1, self.config.finetune_steps // rounds), seed=seed),
            device=self.device)
        communication = {"ms_dino": dataclasses.asdict(ours), "random": dataclasses.asdict(Communication(0, 0, 0)),
                         "fedavg": dataclasses.asdict(fed_traffic)}
        if federated is not None:
            communication["fedavg_dino"] = dataclasses.asdict(federated.communication)
        return {"per_client": per_client, "fedavg": fed_metrics, "labelled_per_client": [len(s.train_labels)
                                                                                          for s in splits],
                "communication": communication}

    def upper_bound(self, data: SeedData, seed: int) -> dict:
        """Supervised from random init on every client's labelled training images pooled (all labels)."""
        rows = torch.cat(data.clients)
        split = LabelledSplit(data.images[rows], data.labels[rows], data.images[data.test], data.labels[data.test],
                              data.n_classes)
        classifier = build_classifier(split, model=None, key=None, random_arch=self.random_arch(data), seed=seed)
        return finetune_and_evaluate(classifier, split, self.recipe(seed, self.config.upper_bound_steps),
                                     device=self.device)

    # ---- progress --------------------------------------------------------------------------------------------------
    def open_bar(self, total: int) -> None:
        if self.config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, disable=None, dynamic_ncols=True)

    def stage(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(f"demo: {name}")
            self.bar.update(1)
        print(f"[demo] {name}", flush=True)


def _run_seed_in_worker(config: DemoConfig, seed: int) -> dict:
    """One seed in a worker process: the data is loaded again (deterministic) and the key read from the report
    folder, so nothing secret crosses the process boundary."""
    demo = Demo(dataclasses.replace(config, progress=False))
    return demo.run_seed(demo.load_data(), Key.load(os.path.join(config.out, "consortium.key")), seed)


def pixel_knn(split: LabelledSplit) -> dict:
    """The floor: k-NN on the raw pixels (centred cosine, the same k rule as the feature probes)."""
    train = split.train_images.flatten(1).float()
    test = split.test_images.flatten(1).float()
    return classification_metrics(knn_probabilities(train, split.train_labels, test, split.n_classes),
                                  split.test_labels)


def run_demo(config: DemoConfig) -> dict:
    """Run the demo (see the module docstring); returns the results and writes ``config.out``."""
    return Demo(config).run()


def add_demo_arguments(parser) -> None:
    from ..cli.flags import add_dataclass_arguments

    add_dataclass_arguments(parser, DemoConfig)
    parser.add_argument("--fast", action="store_true", help="smoke-test sizes (well under a minute on a CPU); other "
                                                             "flags except --out, --seed, --device, --fedavg-dino are "
                                                             "ignored")


def run_demo_command(args) -> int:
    from ..cli.flags import dataclass_from_args

    config = dataclass_from_args(DemoConfig, args)
    if args.fast:
        config = DemoConfig.fast(out=config.out, seed=config.seed, device=config.device, progress=config.progress,
                                 fedavg_dino=config.fedavg_dino)
    run_demo(config)
    return 0
