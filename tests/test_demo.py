"""The one-command demo in its fast mode: runs end to end, writes every report file, counts real payloads, keeps
the per-seed values and the floor / upper bound, and refuses bad settings before any work starts."""
import csv
import json
import os
import stat

import pytest

from msd_fast.cli.commands import main
from msd_fast.evaluation.demo import DemoConfig

REPORT_FILES = ("results.md", "results.csv", "results.json", "loss_curve.png", "pretraining.png",
                "label_fractions.png", "accuracy_vs_communication.png", "samples.png", "consortium.key",
                "seed0/model.safetensors", "timm_model/config.json", "timm_model/model.safetensors")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--fast", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


def test_demo_writes_every_report_file(demo_run):
    for name in REPORT_FILES:
        assert (demo_run / name).stat().st_size > 0, name
    assert stat.S_IMODE(os.stat(demo_run / "consortium.key").st_mode) == 0o600
    table = (demo_run / "results.md").read_text()
    for method in ("MS-DINO", "Fine-tuning only", "FedAvg", "Raw-pixel k-NN (floor)", "upper bound"):
        assert method in table
    with open(demo_run / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)


def test_demo_results_keep_per_seed_values_probes_and_the_pretraining_signals(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    ours, finetune_only, fedavg, floor, upper = results["rows"]
    assert [r["method"].split(" ")[0] for r in results["rows"]] == ["MS-DINO", "Fine-tuning", "FedAvg", "Raw-pixel",
                                                                     "Supervised,"]
    block = results["per_seed"][0]["fractions"]["0.3"]
    clients = block["per_client"]
    for method in ("ms_dino", "random", "knn_ms_dino", "knn_random", "linear_ms_dino", "linear_random", "pixel_knn"):
        assert len(clients[method]) == 3
    mean = sum(m["accuracy"] for m in clients["ms_dino"]) / 3
    assert ours["accuracy_per_seed"] == pytest.approx([mean]) and ours["accuracy"] == pytest.approx(mean)
    assert ours["knn_accuracy"] == pytest.approx(sum(m["accuracy"] for m in clients["knn_ms_dino"]) / 3)
    assert floor["knn_accuracy"] is None and upper["accuracy"] == results["per_seed"][0]["upper_bound"]["accuracy"]
    history = results["per_seed"][0]["pretrain_history"]
    assert len(history) == results["config"]["epochs"]
    for record in history:
        assert 0 <= record["monitor_knn"] <= 1 and record["effective_rank"] > 0 and record["teacher_entropy"] >= 0
    for metrics in clients["ms_dino"] + clients["random"]:
        assert 0 <= metrics["selected_step"] <= results["config"]["finetune_steps"]  # 0: the linear probe


def test_demo_communication_is_the_actual_payload_sizes(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    ours, finetune_only, fedavg = results["rows"][:3]
    shards = [demo_run / "seed0" / "shards" / f"client{c}.shard" for c in range(3)]
    assert ours["upload_bytes"] == int(sum(p.stat().st_size for p in shards) / 3)
    assert ours["download_bytes"] == (demo_run / "seed0" / "model.safetensors").stat().st_size
    assert ours["rounds"] == 1
    assert finetune_only["upload_bytes"] == finetune_only["download_bytes"] == finetune_only["rounds"] == 0
    assert fedavg["rounds"] == results["config"]["fedavg_rounds"]
    assert fedavg["upload_bytes"] > 0 and fedavg["upload_bytes"] == fedavg["download_bytes"]


def test_demo_rerun_keeps_the_key(demo_run):
    before = (demo_run / "consortium.key").read_bytes()
    assert main(["demo", "--fast", "--out", str(demo_run), "--no-progress", "--device", "cpu"]) == 0
    assert (demo_run / "consortium.key").read_bytes() == before


@pytest.mark.parametrize("change, message", [
    (dict(clients=0), "--clients"), (dict(label_fractions="0.1,1.5"), "--label-fractions"),
    (dict(label_fractions="a"), "--label-fractions"), (dict(seeds=0), "--seeds"),
    (dict(test_fraction=1.0), "--test-fraction"), (dict(finetune_lr=float("nan")), "--finetune-lr"),
    (dict(workers=-1), "--workers"), (dict(finetune_steps=5, fedavg_rounds=10), "--finetune-steps")])
def test_bad_demo_settings_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**change)


def test_bad_data_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["demo", "--data", str(tmp_path / "missing"), "--out", str(out), "--no-progress"]) == 2
    assert not out.exists() and "Traceback" not in capsys.readouterr().err
