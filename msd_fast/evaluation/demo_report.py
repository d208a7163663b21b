"""The demo's report: the results table (markdown, CSV, JSON) and its figures, from :class:`~msd_fast.evaluation.demo.Demo`'s
per-seed results. Every number is the mean ± std over seeds of the mean over clients (FedAvg and the upper bound
have one model per seed)."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import torch

from ..atomic import atomic_write, save_figure, write_text
from .communication import human_bytes
from .image_grid import ciphertext_pixels, save_image_columns
from ..server.logs import plot_loss_curve

METHOD_NAMES = {"ms_dino": "MS-DINO (ours): encrypt once, pretrain, fine-tune",
                "fedavg_dino": "FedAvg-DINO (self-supervised FL on plain images) + fine-tuning",
                "random": "Fine-tuning only (random init)",
                "fedavg": "FedAvg (supervised)",
                "pixel_knn": "Raw-pixel k-NN (floor)",
                "upper_bound": "Supervised, all labels pooled (upper bound)"}
METRICS = ("accuracy", "balanced_accuracy", "macro_auc")
CSV_FIELDS = ["label_fraction", "method", "accuracy", "accuracy_std", "balanced_accuracy", "macro_auc",
              "macro_auc_std", "knn_accuracy", "knn_accuracy_std", "linear_probe_accuracy",
              "linear_probe_accuracy_std", "upload_bytes", "download_bytes", "rounds", "accuracy_per_seed"]


PER_CLIENT_MODELS = ("ms_dino", "fedavg_dino", "random")  # one fine-tuned model (and frozen probes) per client


def methods(block: dict) -> list[str]:
    """The rows of one label fraction's results, in table order (FedAvg-DINO only when the run had it)."""
    return [m for m in ("ms_dino", "fedavg_dino", "random", "fedavg", "pixel_knn")
            if m != "fedavg_dino" or m in block["per_client"]]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def _client_mean(metrics: list[dict], name: str) -> float:
    return float(np.mean([m[name] for m in metrics]))


def summary_rows(results: dict) -> list[dict]:
    """One row per (label fraction, method) plus the floor, and one upper-bound row; see :data:`CSV_FIELDS`."""
    per_seed = results["per_seed"]
    rows = []
    for fraction in per_seed[0]["fractions"]:
        blocks = [s["fractions"][fraction] for s in per_seed]
        for method in methods(blocks[0]):
            row = {"label_fraction": float(fraction), "method": METHOD_NAMES[method]}
            for name in METRICS:
                values = [b["fedavg"][name] if method == "fedavg" else _client_mean(b["per_client"][method], name)
                          for b in blocks]
                row[name], row[name + "_std"] = _mean_std(values)
                if name == "accuracy":
                    row["accuracy_per_seed"] = values
            for probe_name, key in (("knn_accuracy", "knn_"), ("linear_probe_accuracy", "linear_")):
                if method in PER_CLIENT_MODELS:
                    row[probe_name], row[probe_name + "_std"] = _mean_std(
                        [_client_mean(b["per_client"][key + method], "accuracy") for b in blocks])
                else:
                    row[probe_name] = row[probe_name + "_std"] = None
            traffic = blocks[0]["communication"].get(method, {"upload_bytes": 0, "download_bytes": 0, "rounds": 0})
            row.update(upload_bytes=traffic["upload_bytes"], download_bytes=traffic["download_bytes"],
                       rounds=traffic["rounds"])
            rows.append(row)
    upper = {"label_fraction": 1.0, "method": METHOD_NAMES["upper_bound"], "knn_accuracy": None,
             "knn_accuracy_std": None, "linear_probe_accuracy": None, "linear_probe_accuracy_std": None,
             "upload_bytes": None, "download_bytes": None, "rounds": None}
    for name in METRICS:
        values = [s["upper_bound"][name] for s in per_seed]
        upper[name], upper[name + "_std"] = _mean_std(values)
        if name == "accuracy":
            upper["accuracy_per_seed"] = values
    return rows + [upper]


def _cell(row: dict, name: str) -> str:
    if row.get(name) is None:
        return "-"
    return f"{row[name]:.3f} ± {row[name + '_std']:.3f}"


def _bytes(value) -> str:
    return "-" if value is None else human_bytes(value)


def markdown_table(rows: list[dict], results: dict) -> str:
    config = results["config"]
    lines = [f"# msd-fast demo: {config['data']}, {config['clients']} clients, {len(results['seeds'])} seeds "
             f"({results['device']}, {results['seconds'] / 60:.1f} min)", "",
             "| label fraction | method | accuracy | macro AUC | k-NN (frozen) | linear probe (frozen) | upload / client "
             "| download / client | rounds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rounds = "-" if r["rounds"] is None else r["rounds"]
        lines.append(f"| {r['label_fraction']:g} | {r['method']} | {_cell(r, 'accuracy')} | {_cell(r, 'macro_auc')} "
                     f"| {_cell(r, 'knn_accuracy')} | {_cell(r, 'linear_probe_accuracy')} | "
                     f"{_bytes(r['upload_bytes'])} | {_bytes(r['download_bytes'])} | {rounds} |")
    lines += ["", f"Mean ± std over seeds {results['seeds']} of the mean over clients (each client fine-tunes on its "
              "own labelled images, holds out a fifth of them to select the step, then refits the linear head on all "
              "of them; FedAvg and the upper bound have one model). Every method: the same network, the same fine-tuning steps and recipe. One held-out test "
              "set per seed, never used for selection. k-NN / linear probe: frozen features, the client's labels. "
              "Raw-pixel k-NN: the same labels, on pixels."]
    if any("fedavg_dino" in s["communication"] for s in results["per_seed"][0]["fractions"].values()):
        lines += ["", "FedAvg-DINO: the same masked-sampling DINO run by every client on its plain images, "
                      f"{config['epochs']} rounds of one local epoch, student, teacher and center averaged by "
                      "client size; its traffic is the serialised (student, teacher, center) up and down per round."]
    if results.get("timm_model"):
        lines += ["", f"`{results['timm_model']}/`: the seed-{results['seeds'][0]} decrypted MS-DINO model as a timm "
                      f"hub folder (`timm.create_model('local-dir:{results['timm_model']}', pretrained=True, "
                      "num_classes=N)`)."]
    audit = results.get("audit")
    if audit:
        lines += ["", f"Privacy (quick audit of the encryption used, {audit['encryption']}; {audit['images']} of the "
                      f"seed-{results['seeds'][0]} client 0 images attacked, {audit['seconds']:.0f} s; SECURITY.md "
                      "explains each attack):", ""]
        lines += [f"- {line}" for line in audit["lines"]]
    return "\n".join(lines) + "\n"


def write_report(results: dict, dataset, key, config) -> None:
    """results.md / .csv / .json and the figures, atomically, into ``config.out``; prints the table."""
    out = config.out
    rows = summary_rows(results)
    results["rows"] = rows
    table = markdown_table(rows, results)
    write_text(os.path.join(out, "results.md"), table)
    with atomic_write(os.path.join(out, "results.csv"), "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "accuracy_per_seed": " ".join(f"{v:.4f}" for v in r["accuracy_per_seed"])}
                         for r in rows)
    write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    first = f"seed{results['seeds'][0]}"
    plot_loss_curve(os.path.join(out, first, "pretrain", "log.jsonl"), os.path.join(out, "loss_curve.png"))
    plot_pretraining(results, os.path.join(out, "pretraining.png"))
    plot_label_fractions(rows, os.path.join(out, "label_fractions.png"))
    plot_accuracy_vs_communication(rows, os.path.join(out, "accuracy_vs_communication.png"))
    plot_samples(dataset, key, config, os.path.join(out, "samples.png"))
    print(table)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pretraining(results: dict, path: str) -> None:
    """Per epoch and seed: loss, the k-NN monitor, the backbone's effective rank and feature std, the teacher's
    entropies (collapse signals)."""
    plt = _pyplot()
    panels = (("loss", "DINO loss"), ("monitor_knn", "k-NN monitor (clients' labels)"),
              ("effective_rank", "feature effective rank"), ("feature_std", "feature std (per dim)"),
              ("teacher_entropy", "teacher entropy (nats)"), ("usage_entropy", "entropy of mean teacher output"))
    figure, axes = plt.subplots(2, 3, figsize=(11, 5.5), dpi=110)
    for axis, (name, title) in zip(axes.flat, panels):
        for seed_result in results["per_seed"]:
            history = [h for h in seed_result["pretrain_history"] if name in h]
            axis.plot([h["epoch"] + 1 for h in history], [h[name] for h in history], "o-", ms=2.5,
                      label=f"seed {seed_result['seed']}")
            federated = [h for h in seed_result.get("fedavg_dino_history", []) if name in h]
            if federated:  # FedAvg-DINO's global teacher, one point per round (a round is one local epoch)
                axis.plot([h["round"] + 1 for h in federated], [h[name] for h in federated], "s--", ms=2.5,
                          label=f"FedAvg-DINO, seed {seed_result['seed']}")
        if name in ("teacher_entropy", "usage_entropy") and results["per_seed"][0]["pretrain_history"]:
            uniform = results["per_seed"][0]["pretrain_history"][0].get("uniform_entropy")
            if uniform:
                axis.axhline(uniform, color="grey", ls=":", lw=1, label="ln K (uniform)")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle("server-side pretraining (teacher, all tokens)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def plot_label_fractions(rows: list[dict], path: str) -> None:
    """Test accuracy against the label fraction per method, with the floor and the upper bound."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for key, style in (("ms_dino", "o-"), ("fedavg_dino", "D-"), ("random", "s-"), ("fedavg", "^-"),
                       ("pixel_knn", "x--")):
        mine = sorted((r for r in rows if r["method"] == METHOD_NAMES[key]), key=lambda r: r["label_fraction"])
        if not mine:
            continue
        axis.errorbar([r["label_fraction"] for r in mine], [r["accuracy"] for r in mine],
                      yerr=[r["accuracy_std"] for r in mine], fmt=style, capsize=3, label=METHOD_NAMES[key])
        if key == "ms_dino":
            axis.errorbar([r["label_fraction"] for r in mine], [r["knn_accuracy"] for r in mine],
                          yerr=[r["knn_accuracy_std"] for r in mine], fmt="o:", capsize=2, alpha=0.7,
                          label="MS-DINO frozen features, k-NN")
    upper = next(r for r in rows if r["method"] == METHOD_NAMES["upper_bound"])
    axis.axhspan(upper["accuracy"] - upper["accuracy_std"], upper["accuracy"] + upper["accuracy_std"], color="grey",
                 alpha=0.2)
    axis.axhline(upper["accuracy"], color="grey", lw=1, label=METHOD_NAMES["upper_bound"])
    axis.set_xscale("log")
    axis.set_xlabel("label fraction per client")
    axis.set_ylabel("test accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def plot_accuracy_vs_communication(rows: list[dict], path: str) -> None:
    """Accuracy against bytes per client (up + down, log scale) and against communication rounds, at the first
    label fraction."""
    plt = _pyplot()
    fraction = rows[0]["label_fraction"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for key, marker in (("ms_dino", "o"), ("fedavg_dino", "D"), ("random", "s"), ("fedavg", "^")):
        r = next((r for r in rows if r["method"] == METHOD_NAMES[key] and r["label_fraction"] == fraction), None)
        if r is None:
            continue
        label = f"{METHOD_NAMES[key].split(':')[0].split(' (')[0]} ({r['rounds']} rounds)"
        megabytes = max((r["upload_bytes"] + r["download_bytes"]) / 1e6, 1e-3)  # no traffic: at the axis floor
        axes[0].errorbar(megabytes, r["accuracy"], yerr=r["accuracy_std"], fmt=marker, capsize=3, label=label)
        axes[1].errorbar(r["rounds"], r["accuracy"], yerr=r["accuracy_std"], fmt=marker, capsize=3, label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes per client (up + down), MB")
    axes[1].set_xlabel("communication rounds")
    for axis in axes:
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"label fraction {fraction:g}", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def plot_samples(dataset, key, config, path: str) -> None:
    """Four images per class (the data the demo uses; a row per class, at most 10), and the first of each as the
    server receives it (encrypted) and as the client gets it back (decrypted)."""
    images, labels = dataset.to_tensor(), torch.as_tensor(dataset.labels)
    classes = sorted(set(labels.tolist()))[:10]
    names = list(dataset.class_names or [str(c) for c in classes])
    spec = config.encryption()
    blank = torch.full_like(images[:1], 255)
    samples = [[blank] * 4 for _ in classes]  # [class][sample]: a class with fewer images keeps blank cells
    for row, label in enumerate(classes):
        for col, index in enumerate(torch.nonzero(labels == label).view(-1)[:4].tolist()):
            samples[row][col] = images[index:index + 1]
    firsts = torch.cat([row[0] for row in samples])
    ids = torch.tensor(classes)
    encrypted = spec.encrypt(firsts, key, config.patch_size, sample_ids=ids)
    decrypted = spec.decrypt(encrypted, key, config.patch_size, sample_ids=ids)
    columns = [(f"sample {col + 1}", torch.cat([row[col] for row in samples])) for col in range(4)]
    columns += [("encrypted", ciphertext_pixels(encrypted)), ("decrypted", decrypted)]
    save_image_columns(path, columns, row_labels=[names[label] if label < len(names) else str(label)
                                                  for label in classes])
