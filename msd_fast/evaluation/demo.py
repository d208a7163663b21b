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
from ..data import SPEC_HELP, ImageSet, label_fraction_subset, load_dataset, split_clients, train_test_split
from ..data.convert import check_image_size
from ..client import Recipe
from . import FedAvgSettings, LabelledSplit, build_classifier, fedavg_baseline, finetune_and_evaluate, probe
from .communication import Communication, file_bytes
from .metrics import classification_metrics
from .probe import knn_probabilities
from ..protocol.encryption import CIPHER_DTYPES, SCHEMES, EncryptionSpec
from ..checks import is_positive_int, require
from ..settings import Part, build_part, compose, flag, quick_flag
from ..keys import Key
from ..server import PretrainConfig, export_backbone, pretrain
from ..client.finetune import standardisation
from ..client.timm_export import export_timm
from .fedavg_dino import FedAvgDINOSettings, fedavg_dino, fedavg_dino_classifier
from ..protocol.shards import open_shard



# The server's settings the demo passes on (the rest of PretrainConfig is per run: shards, out, seed, device, ...),
# at the demo's scale: a small ViT, few epochs and small batches for a few thousand images.
PRETRAINING = Part(
    PretrainConfig, "pretraining (the server; PretrainConfig at the demo's scale)",
    exclude=("shards", "out", "device", "seed", "log_every", "resume", "progress"),
    rename={"batch_size": "pretrain_batch_size", "lr": "pretrain_lr", "min_lr": "pretrain_min_lr",
            "weight_decay": "pretrain_weight_decay", "weight_decay_end": "pretrain_weight_decay_end"},
    defaults=dict(depth=4, embed_dim=96, num_heads=3, drop_path=0.0, out_dim=256, head_hidden_dim=512,
                  head_bottleneck_dim=128, teacher_views="all", local_views=4, epochs=20, batch_size=32, lr=4e-3,
                  momentum_teacher=0.99),
    helps={"batch_size": "pretraining batch size (small data needs updates more than large batches)"},
    default_texts={"warmup_epochs": "max(1, --epochs // 10)"})
# The one supervised recipe every method shares (fine-tuning, the from-scratch baseline, FedAvg, the upper bound).
RECIPE = Part(
    Recipe, "fine-tuning recipe (every method)", exclude=("seed",),
    rename={"steps": "finetune_steps", "lr": "finetune_lr", "batch_size": "finetune_batch_size",
            "min_lr": "finetune_min_lr", "warmup_steps": "finetune_warmup_steps",
            "weight_decay": "finetune_weight_decay"},
    helps={"steps": "fine-tuning steps (every method; FedAvg: rounds x local steps)"})
FEDAVG = Part(FedAvgSettings, "supervised FedAvg baseline (local steps = --finetune-steps / --fedavg-rounds)",
              exclude=("local_steps", "seed"), rename={"rounds": "fedavg_rounds",
                                                       "client_fraction": "fedavg_client_fraction"})


@dataclasses.dataclass
@compose(PRETRAINING, RECIPE, FEDAVG)
class DemoConfig:
    """Every setting of the demo: its own (data, clients, seeds, encryption, ...) and, composed, the pretraining
    settings (:class:`~msd_fast.server.PretrainConfig`), the fine-tuning :class:`~msd_fast.client.Recipe` and the
    :class:`~msd_fast.evaluation.FedAvgSettings` it passes on."""

    out: str = flag("demo_out", "report folder (also holds the demo's key, shards, checkpoints and models)")
    data: str = flag("synthetic:2400", f"labelled data (class sub-folders, a labelled .npz, a manifest with labels): "
                                     f"{SPEC_HELP}")
    image_size: Optional[int] = flag(None, "resize images to this side", default_text="as stored; synthetic: 32")
    clients: int = flag(3, "simulated clients")
    alpha: Optional[float] = flag(None, "Dirichlet concentration of a non-IID split", default_text="IID")
    test_fraction: float = flag(0.25, "held-out test fraction")
    label_fractions: str = flag("0.1", "comma-separated fractions of each client's images with labels, e.g. "
                                       "0.01,0.1,1 (one table block and one point of the sweep plot each)")
    seeds: int = flag(3, "seeds (splits, pretraining, fine-tuning); results are mean ± std over them")
    seed: int = flag(0, "first seed")
    patch_size: int = flag(8, "ViT patch size (= encryption block size)")
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
    quick: bool = quick_flag("well under a minute on a CPU; every other setting except --out, --seed, --device, "
                             "--progress and --fedavg-dino is ignored")
    fedavg_dino: bool = flag(False, "add the FedAvg-DINO row: the same masked-sampling DINO run by the clients on "
                                    "their plain images, --epochs rounds of one local epoch, weights averaged "
                                    "(doubles the pretraining time)")

    def __post_init__(self):
        self.fractions()  # validates
        self.encryption()
        for name in ("clients", "seeds", "upper_bound_steps", "patch_size"):
            require(self, name, is_positive_int, "a positive integer")
        require(self, "workers", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                "an integer >= 0")
        require(self, "test_fraction", lambda v: 0 < v < 1, "in (0, 1)")
        require(self, "alpha", lambda v: v is None or v > 0, "> 0")
        if self.image_size is not None:
            check_image_size(self.image_size, "--image-size")
        # the composed settings, checked by their own classes (the messages name the demo's flags)
        self.pretrain_config(["<shards>"], self.out, self.seed, device="cpu")
        self.recipe(self.seed)
        self.recipe(self.seed, self.upper_bound_steps)
        self.fedavg_settings(self.seed)
        if self.finetune_steps < self.fedavg_rounds:
            raise ValueError(f"--finetune-steps ({self.finetune_steps}) must be >= --fedavg-rounds "
                             f"({self.fedavg_rounds})")

    def pretrain_config(self, shards: list[str], out: str, seed: int, *, device: str) -> PretrainConfig:
        """The server's settings for one seed's run on ``shards`` (no progress bar: the demo shows its own)."""
        warmup = self.warmup_epochs if self.warmup_epochs is not None else max(1, self.epochs // 10)
        return build_part(self, PretrainConfig, shards=shards, out=out, seed=seed, device=device, progress=False,
                          warmup_epochs=warmup)

    def recipe(self, seed: int, steps: Optional[int] = None) -> Recipe:
        """The shared recipe (``steps``: default --finetune-steps)."""
        return build_part(self, Recipe, seed=seed, **({} if steps is None else {"steps": steps}))

    def fedavg_settings(self, seed: int) -> FedAvgSettings:
        """FedAvg with the fine-tuning steps spread over its rounds."""
        return build_part(self, FedAvgSettings, local_steps=max(1, self.finetune_steps // self.fedavg_rounds),
                          seed=seed)

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
    def smoke_test(cls, **changes) -> "DemoConfig":
        """The ``--quick`` configuration (well under a minute on two CPU cores; its numbers mean nothing)."""
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
        groups = dataset.groups  # patients (DICOM, NIfTI, manifests): each stays on one side and with one client
        train, test = train_test_split(labels, config.test_fraction, seed=seed, groups=groups)
        clients = [train[rows] for rows in split_clients(labels[train], config.clients, alpha=config.alpha, seed=seed,
                                                          groups=None if groups is None else groups[train.numpy()])]
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
        return self.config.pretrain_config(shards, os.path.join(folder, "pretrain"), seed,
                                           device=str(self.device) if self.device.type == "cpu" else "auto")

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
                per_client[name].append(finetune_and_evaluate(classifier, split, self.config.recipe(seed * 1009 + c),
                                                              device=self.device, pretrained=name in pretrained))
            per_client["pixel_knn"].append(pixel_knn(split))
        fed_metrics, fed_traffic = fedavg_baseline(splits, self.random_arch(data), self.config.recipe(seed),
                                                   self.config.fedavg_settings(seed), device=self.device)
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
        return finetune_and_evaluate(classifier, split, self.config.recipe(seed, self.config.upper_bound_steps),
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
