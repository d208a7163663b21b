"""The client-side downstream commands, in process: ``msd-fast finetune``, ``probe`` and ``fedavg`` on tiny settings
(printed metrics, results JSON written atomically, the random-init baseline being the exported network, one-line
errors naming the flag, the key never printed)."""
import json
import os
import re

import numpy as np
import pytest

from msd_fast import Key
from msd_fast.cli.commands import main
from msd_fast.data import label_fraction_subset, split_clients, synthetic_dataset, train_test_split
from msd_fast.client import exported_architecture
from msd_fast.evaluation.probe import default_k
from msd_fast.server.export import read_export_metadata

TINY_ARCH = ["--depth", "1", "--embed-dim", "24", "--num-heads", "2", "--patch-size", "8"]
FAST = ["--steps", "4", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def key_file(exported_backbones, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "consortium.key"
    Key.from_secret(exported_backbones["secret"]).save(path)
    return str(path)


def read_results(folder, name):
    assert sorted(os.listdir(folder)) == [name]  # no temporary file left behind
    with open(os.path.join(folder, name)) as handle:
        return json.load(handle)


def test_finetune_a_pretrained_backbone_prints_and_writes_the_metrics(exported_backbones, key_file, tmp_path,
                                                                      capsys):
    assert main(["finetune", "--model", exported_backbones["image"], "--key", key_file, "--data", "synthetic:50",
                 "--label-fraction", "0.5", "--seed", "1", "--out", str(tmp_path / "out"), *FAST]) == 0
    out = capsys.readouterr().out
    key = Key.load(key_file)
    assert key.fingerprint in out and key._secret.hex() not in out
    results = read_results(tmp_path / "out", "finetune.json")
    metrics = results["metrics"]
    for text in (f"accuracy {metrics['accuracy']:.4f}", f"balanced accuracy {metrics['balanced_accuracy']:.4f}",
                 f"macro AUC {metrics['macro_auc']:.4f}", "confusion matrix", "spiculated_mass"):
        assert text in out
    # 50 synthetic scans at the model's 32x32: 10 held out (stratified 0.2), half of the other 40 labelled.
    assert results["data"]["geometry"] == [1, 32, 32]
    assert (results["data"]["n_test"], results["data"]["n_train"], metrics["n"]) == (10, 20, 10)
    assert np.array(metrics["confusion_matrix"]).sum() == 10 and np.array(metrics["confusion_matrix"]).shape == (7, 7)
    assert results["model"]["init"] == "pretrained" and results["model"]["domain"] == "plain"
    assert results["model"]["key_fingerprint"] == key.fingerprint
    assert results["recipe"]["steps"] == 4 and results["recipe"]["seed"] == 1
    # The same command again gives the same numbers (seeded head, data order and flips).
    assert main(["finetune", "--model", exported_backbones["image"], "--key", key_file, "--data", "synthetic:50",
                 "--label-fraction", "0.5", "--seed", "1", "--out", str(tmp_path / "out"), *FAST]) == 0
    assert read_results(tmp_path / "out", "finetune.json")["metrics"] == metrics


def test_finetune_in_the_encrypted_domain_and_on_separate_test_data(exported_backbones, key_file, tmp_path, capsys):
    assert main(["finetune", "--model", exported_backbones["image"], "--key", key_file, "--domain", "encrypted",
                 "--data", "synthetic:30", "--test-data", "synthetic:12", "--out", str(tmp_path), *FAST]) == 0
    results = read_results(tmp_path, "finetune.json")
    assert results["model"]["domain"] == "encrypted" and "encrypted domain" in capsys.readouterr().out
    assert (results["data"]["n_train"], results["data"]["n_test"]) == (30, 12)
    assert results["data"]["held_out"] == "synthetic:12 [test]"


def test_random_init_baseline_uses_the_exported_architecture(exported_backbones, tmp_path, capsys):
    assert main(["finetune", "--init", "random", "--model", exported_backbones["image"], "--data", "synthetic:30",
                 "--out", str(tmp_path), *FAST]) == 0
    model = read_results(tmp_path, "finetune.json")["model"]
    expected = exported_architecture(read_export_metadata(exported_backbones["image"]))
    assert model["init"] == "random" and model["architecture_from"] == exported_backbones["image"]
    assert {k: model[k] for k in expected} == {**expected, "image_size": list(expected["image_size"])}
    assert "from random init" in capsys.readouterr().out


def test_finetune_from_random_init_with_architecture_flags(tmp_path, capsys):
    assert main(["finetune", "--init", "random", "--data", "synthetic:30", "--image-size", "16", *TINY_ARCH,
                 "--out", str(tmp_path), *FAST]) == 0
    results = read_results(tmp_path, "finetune.json")
    assert results["data"]["geometry"] == [1, 16, 16]
    assert {k: results["model"][k] for k in ("depth", "embed_dim", "num_heads", "patch_size", "image_size")} == \
        {"depth": 1, "embed_dim": 24, "num_heads": 2, "patch_size": 8, "image_size": [16, 16]}
    assert "depth 1, embed dim 24, num heads 2, patch 8" in capsys.readouterr().out


def test_probe_a_token_mode_backbone_and_the_random_baseline(exported_backbones, key_file, tmp_path, capsys):
    assert main(["probe", "--model", exported_backbones["token"], "--key", key_file, "--data", "synthetic:40",
                 "--k", "5", "--out", str(tmp_path / "token"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    results = read_results(tmp_path / "token", "probe.json")
    assert set(results["metrics"]) == {"knn", "linear"} and results["k"] == 5
    assert results["model"]["mode"] == "token" and "key-derived token embedder" in out
    for name, title in (("knn", "k-NN (k = 5, cosine of centred features)"), ("linear", "linear probe")):
        assert title in out and f"accuracy {results['metrics'][name]['accuracy']:.4f}" in out
        assert results["metrics"][name]["n"] == 8

    assert main(["probe", "--init", "random", "--data", "synthetic:40", "--image-size", "32", *TINY_ARCH,
                 "--out", str(tmp_path / "random"), "--device", "cpu"]) == 0
    results = read_results(tmp_path / "random", "probe.json")
    assert results["model"]["init"] == "random" and results["k"] == default_k(results["data"]["n_train"])  # scaled with the labels


def test_fedavg_prints_metrics_and_the_communication_of_the_payload(tmp_path, capsys):
    assert main(["fedavg", "--data", "synthetic:60", "--image-size", "32", *TINY_ARCH, "--clients", "3",
                 "--alpha", "0.5", "--rounds", "2", "--local-steps", "1", "--client-fraction", "0.67",
                 "--label-fraction", "0.5", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    results = read_results(tmp_path, "fedavg.json")
    traffic = results["communication"]
    # 2 of 3 clients per round, 2 rounds: 4 transfers each way over 3 clients.
    assert traffic["upload_bytes"] == traffic["download_bytes"] == round(4 / 3 * traffic["model_bytes"])
    assert traffic["rounds"] == 2 and f"{traffic['upload_bytes']:,} bytes" in out and "over 2 rounds" in out
    assert results["settings"] == {"rounds": 2, "local_steps": 1, "client_fraction": 0.67, "seed": 0}
    # The documented pipeline: stratified test split, Dirichlet clients, each client's stratified label fraction.
    labels = synthetic_dataset(60, size=32).labels
    train, _ = train_test_split(labels, 0.2, seed=0)
    expected = [len(label_fraction_subset(labels[train][rows], 0.5, seed=c))
                for c, rows in enumerate(split_clients(labels[train], 3, alpha=0.5, seed=0))]
    assert results["data"]["clients"] == expected and results["data"]["n_train"] == sum(expected) < 48
    assert f"accuracy {results['metrics']['accuracy']:.4f}" in out and "Dirichlet alpha 0.5" in out


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--data", "synthetic:20", "--init", "pretrained"], "--model: --init pretrained needs"),
    (["finetune", "--data", "synthetic:20", "--model", "{image}"], "--key: a pretrained backbone needs"),
    (["finetune", "--data", "synthetic:20", "--model", "{image}", "--key", "{key}", "--depth", "2"],
     "--depth: the architecture comes from --model"),
    (["finetune", "--data", "synthetic:20", "--model", "{image}", "--key", "{wrong}"], "not with this key"),
    (["finetune", "--data", "synthetic:20", "--model", "{token}", "--key", "{key}", "--domain", "plain"],
     "--domain: .* is a token-mode backbone"),
    (["finetune", "--data", "synthetic:20", "--domain", "encrypted"], "--domain encrypted: only a pretrained"),
    (["finetune", "--data", "synthetic:20", "--model", "{junk}", "--key", "{key}"], "is not a safetensors file"),
    (["finetune", "--data", "synthetic:20", "--model", "{image}", "--key", "{key}", "--image-size", "16"],
     "--data: images are 1x16x16 but --model"),
    (["finetune", "--data", "synthetic:20", "--image-size", "30"], "patch size 16 does not divide"),
    (["finetune", "--data", "{unlabeled}", "--image-size", "16", "--patch-size", "8"], "has no labels"),
    (["finetune", "--data", "synthetic:20", "--label-fraction", "0"], r"--label-fraction must be in \(0, 1\]"),
    (["finetune", "--data", "synthetic:20", "--test-fraction", "1"], r"--test-fraction must be in \(0, 1\)"),
    (["finetune", "--data", "synthetic:20", "--arch", "resnet18", "--image-size", "32"],
     "not a timm VisionTransformer"),
    (["probe", "--data", "synthetic:20", "--k", "0"], "--k must be >= 1"),
    (["fedavg", "--data", "synthetic:20", "--clients", "2", "--rounds", "0"], "rounds must be a positive int"),
    (["fedavg", "--data", "synthetic:20", "--clients", "30", "--image-size", "32"], "cannot give 30 clients"),
])
def test_errors_are_one_clear_line(exported_backbones, key_file, tmp_path, capsys, argv, message):
    wrong = tmp_path / "wrong.key"
    Key.from_secret(b"some other consortium").save(wrong)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    np.save(tmp_path / "unlabeled.npy", np.zeros((6, 16, 16), dtype=np.uint8))
    names = {"image": exported_backbones["image"], "token": exported_backbones["token"], "key": key_file,
             "wrong": str(wrong), "junk": str(tmp_path / "junk.safetensors"),
             "unlabeled": str(tmp_path / "unlabeled.npy")}
    argv = [arg.format(**names) for arg in argv]
    assert main(argv + ["--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"msd-fast {argv[0]}: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert exported_backbones["secret"].hex() not in err


def test_test_fraction_and_test_data_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as error:
        main(["finetune", "--data", "synthetic:20", "--test-fraction", "0.3", "--test-data", "synthetic:5"])
    assert error.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def write_class_folder(folder, classes, per_class=4, size=16):
    from PIL import Image

    generator = np.random.default_rng(len(classes))
    for name in classes:
        os.makedirs(folder / name)
        for i in range(per_class):
            Image.fromarray(generator.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return str(folder)


def test_image_folders_and_test_folders_with_other_classes(tmp_path, capsys):
    train = write_class_folder(tmp_path / "train", ["benign", "malignant"])
    test = write_class_folder(tmp_path / "test", ["benign", "malignant"], per_class=2)
    assert main(["finetune", "--init", "random", "--data", train, "--test-data", test, "--test-split", "train",
                 *TINY_ARCH, "--out", str(tmp_path / "out"), *FAST]) == 0
    results = read_results(tmp_path / "out", "finetune.json")
    assert results["data"]["class_names"] == ["benign", "malignant"] and results["metrics"]["n"] == 4
    assert "0 benign" in capsys.readouterr().out

    other = write_class_folder(tmp_path / "other", ["benign", "cyst"], per_class=2)
    assert main(["finetune", "--init", "random", "--data", train, "--test-data", other, "--test-split", "train",
                 *TINY_ARCH, *FAST]) == 2
    assert "are not those of --data ['benign', 'malignant']" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["finetune", "probe", "fedavg"])
def test_an_out_that_is_a_file_is_refused_before_any_work(exported_backbones, key_file, tmp_path, capsys,
                                                          monkeypatch, command):
    import msd_fast.cli.downstream as downstream_cli

    def no_work(*_, **__):
        raise AssertionError("work started before --out was checked")

    for name in ("_prepare", "fedavg_baseline", "finetune_and_evaluate"):
        monkeypatch.setattr(downstream_cli, name, no_work)
    blocker = tmp_path / "results.json"
    blocker.write_text("keep me")
    argv = [command, "--model", exported_backbones["image"], "--data", "synthetic:50", "--out", str(blocker)]
    argv += ["--clients", "2"] if command == "fedavg" else ["--key", key_file]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"msd-fast {command}: error: --out {blocker} is a file, not a folder"]
    assert blocker.read_text() == "keep me"
