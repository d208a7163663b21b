"""The one-command demo in its fast mode: runs end to end, writes every report file, counts real payloads."""
import csv
import json
import os
import stat

import pytest

from msd_fast.cli import main

REPORT_FILES = ("results.md", "results.csv", "results.json", "loss_curve.png", "accuracy_vs_communication.png",
                "samples.png", "model.safetensors", "consortium.key")


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
    for method in ("MS-DINO", "Fine-tuning only", "FedAvg"):
        assert method in table
    with open(demo_run / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)


def test_demo_communication_is_the_actual_payload_sizes(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    ours, finetune_only, fedavg = results["rows"]
    shards = [demo_run / "shards" / f"client{c}.shard" for c in range(3)]
    assert ours["upload_bytes"] == int(sum(p.stat().st_size for p in shards) / 3)
    assert ours["download_bytes"] == (demo_run / "model.safetensors").stat().st_size and ours["rounds"] == 1
    assert finetune_only["upload_bytes"] == finetune_only["download_bytes"] == finetune_only["rounds"] == 0
    assert fedavg["rounds"] == results["config"]["finetune_epochs"] // results["config"]["local_epochs"]
    assert fedavg["upload_bytes"] > 0 and fedavg["upload_bytes"] == fedavg["download_bytes"]
    assert len(results["per_client"]["ms_dino"]) == 3 and "confusion_matrix" in results["per_client"]["ms_dino"][0]


def test_demo_rerun_keeps_the_key(demo_run):
    before = (demo_run / "consortium.key").read_bytes()
    assert main(["demo", "--fast", "--out", str(demo_run), "--no-progress", "--device", "cpu"]) == 0
    assert (demo_run / "consortium.key").read_bytes() == before
