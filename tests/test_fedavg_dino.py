"""FedAvg-DINO (msd_fast.evaluation.fedavg_dino): the server's average is weighted by client size (student,
teacher and center), the traffic is the serialised payloads, runs are reproducible, the global teacher learns
something and becomes a classifier on plain images; bad inputs are refused naming the argument."""
import pytest
import torch

from msd_fast.data import synthetic_dataset
from msd_fast.evaluation import fedavg_dino as fd
from msd_fast.evaluation.communication import tensors_bytes
from msd_fast.evaluation.fedavg_dino import (FedAvgDINOSettings, fedavg_dino, fedavg_dino_classifier,
                                             pooled_standardisation)
from msd_fast.server import PretrainConfig

CPU = torch.device("cpu")


def tiny_config(**changes):
    return PretrainConfig(**{**dict(shards=["<plain images>"], depth=1, embed_dim=24, num_heads=2, drop_path=0.0,
                                    out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16, local_views=1,
                                    batch_size=16, warmup_epochs=0), **changes})


@pytest.fixture(scope="module")
def clients():
    images = synthetic_dataset(56, size=32).to_tensor()
    return [images[:24], images[24:]]


LEARNING = dict(lr=0.05, momentum_teacher=0.5)  # large steps and a fast EMA, so 6 steps move the teacher visibly


@pytest.fixture(scope="module")
def run(clients):
    return fedavg_dino(clients, tiny_config(**LEARNING), FedAvgDINOSettings(rounds=2, local_steps=3, patch_size=8),
                       device=CPU)


def test_the_server_averages_student_teacher_and_center_weighted_by_client_size(monkeypatch):
    """A fake local step sets every weight and the center to the client's pixel value (client 0: 10, client 1: 50);
    the global model is then (n0 * 10 + n1 * 50) / (n0 + n1) everywhere."""
    def fake_step(student, teacher, loss_fn, optimizer, inputs, views, config, **kwargs):
        value = float(inputs.float().mean())
        with torch.no_grad():
            for param in list(student.parameters()) + list(teacher.parameters()):
                param.fill_(value)
            loss_fn.center.fill_(value)
        return torch.tensor(value)

    monkeypatch.setattr(fd, "distillation_step", fake_step)
    monkeypatch.setattr(fd, "collapse_signals", lambda *args: {})
    clients = [torch.full((16, 1, 16, 16), 10, dtype=torch.uint8), torch.full((48, 1, 16, 16), 50, dtype=torch.uint8)]
    result = fedavg_dino(clients, tiny_config(), FedAvgDINOSettings(rounds=1, local_steps=2, patch_size=8),
                         device=CPU)
    expected = (16 * 10 + 48 * 50) / 64
    for name, param in result.teacher.named_parameters():
        assert torch.allclose(param, torch.full_like(param, expected)), name
    assert torch.allclose(result.center, torch.full_like(result.center, expected))
    assert result.history[0]["loss"] == pytest.approx(expected)  # the loss is weighted the same way
    rms = ((16 * (10 - 127.5) ** 2 + 48 * (50 - 127.5) ** 2) / 64) ** 0.5
    assert float(result.teacher.input_std) == pytest.approx(rms)  # pooled over every client, not one client's


def test_traffic_is_the_serialised_payload_of_every_round(run, clients):
    model = {f"{part}.{k}": v.clone() for part in ("student", "teacher") for k, v in run.teacher.state_dict().items()}
    model["center"] = run.center
    per_round = tensors_bytes(model)
    handshake_up = tensors_bytes({"moments": torch.zeros(3, dtype=torch.float64)})
    handshake_down = tensors_bytes({"standardisation": torch.zeros(2, dtype=torch.float64)})
    assert run.communication.rounds == 2
    assert run.communication.upload_bytes == 2 * per_round + handshake_up
    assert run.communication.download_bytes == 2 * per_round + handshake_down
    assert per_round > 2 * sum(p.numel() * 4 for p in run.teacher.backbone.parameters())  # student + teacher


def test_runs_are_reproducible_and_the_teacher_moves(run, clients):
    again = fedavg_dino(clients, tiny_config(**LEARNING), FedAvgDINOSettings(rounds=2, local_steps=3, patch_size=8),
                        device=CPU)
    for (name, a), b in zip(run.teacher.state_dict().items(), again.teacher.state_dict().values()):
        assert torch.equal(a, b), name
    from msd_fast.server.trainer import build_networks
    initial = build_networks(tiny_config(**LEARNING), fd.plain_geometry(clients[0], 8), (0.0, 1.0))[1]
    moved = max(float((a - b).abs().max()) for (k, a), b in zip(run.teacher.backbone.state_dict().items(),
                                                                  initial.backbone.state_dict().values()))
    assert moved > 1e-4
    assert len(run.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in run.history)
    assert {"teacher_entropy", "effective_rank", "feature_std"} <= set(run.history[-1])


def test_the_classifier_is_the_teacher_backbone_on_plain_images(run, clients):
    classifier = fedavg_dino_classifier(run.teacher, 7, seed=3).eval()
    images = clients[0][:5]
    with torch.no_grad():
        assert torch.allclose(classifier.features(images), run.teacher.features(images), atol=1e-5)
        assert classifier(images).shape == (5, 7)
    again = fedavg_dino_classifier(run.teacher, 7, seed=3)
    assert torch.equal(again.vit.head.weight, classifier.vit.head.weight)  # the seed fixes the new head


def test_pooled_standardisation_is_mid_grey_and_the_rms_of_all_pixels_about_it(clients):
    pooled = pooled_standardisation([fd._moments(c) for c in clients])
    every = torch.cat(clients).double()
    assert pooled == pytest.approx((127.5, float((every - 127.5).square().mean().sqrt())), rel=1e-9)


def test_bad_inputs_are_refused(clients):
    settings = FedAvgDINOSettings(rounds=1, local_steps=1, patch_size=8)
    with pytest.raises(ValueError, match="clients"):
        fedavg_dino([], tiny_config(), settings, device=CPU)
    with pytest.raises(ValueError, match=r"clients\[1\] has no images"):
        fedavg_dino([clients[0], clients[1][:0]], tiny_config(), settings, device=CPU)
    with pytest.raises(ValueError, match=r"clients\[1\]"):
        fedavg_dino([clients[0], clients[1][:, :, :16, :16]], tiny_config(), settings, device=CPU)
    with pytest.raises(ValueError, match="uint8"):
        fedavg_dino([clients[0].float()], tiny_config(), settings, device=CPU)
    with pytest.raises(ValueError, match="patch_size"):
        fedavg_dino(clients, tiny_config(), FedAvgDINOSettings(rounds=1, local_steps=1, patch_size=5), device=CPU)
    for field in ("rounds", "local_steps", "patch_size"):
        with pytest.raises(ValueError, match=field):
            FedAvgDINOSettings(**{field: 0})


def test_demo_adds_the_fedavg_dino_row_with_its_traffic_and_rounds(tmp_path):
    import csv
    import json

    from msd_fast.evaluation.demo import DemoConfig, run_demo

    out = tmp_path / "demo"
    run_demo(DemoConfig.smoke_test(out=str(out), device="cpu", progress=False, audit=False, fedavg_dino=True))
    results = json.loads((out / "results.json").read_text())
    methods = [r["method"].split(" ")[0] for r in results["rows"]]
    assert methods == ["MS-DINO", "FedAvg-DINO", "Fine-tuning", "FedAvg", "Raw-pixel", "Supervised,"]
    ours, federated = results["rows"][:2]
    block = results["per_seed"][0]["fractions"]["0.3"]
    for name in ("fedavg_dino", "knn_fedavg_dino", "linear_fedavg_dino"):
        assert len(block["per_client"][name]) == 3
    mean = sum(m["accuracy"] for m in block["per_client"]["fedavg_dino"]) / 3
    assert federated["accuracy"] == pytest.approx(mean) and federated["knn_accuracy"] is not None
    epochs = results["config"]["epochs"]
    assert federated["rounds"] == epochs and len(results["per_seed"][0]["fedavg_dino_history"]) == epochs
    # every round moves two models (student and teacher) both ways: far more than MS-DINO's one download
    assert federated["download_bytes"] > 2 * epochs * ours["download_bytes"] * 0.9
    with open(out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6
    assert "FedAvg-DINO" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_communication.png").stat().st_size > 0
    assert (out / "timm_model" / "config.json").exists() and (out / "timm_model" / "model.safetensors").exists()


def test_the_demo_flag_reaches_the_config_also_with_quick(monkeypatch):
    from msd_fast.cli.commands import main
    from msd_fast.evaluation import demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["demo", "--quick", "--fedavg-dino", "--out", "unused"]) == 0
    assert main(["demo", "--out", "unused"]) == 0
    assert seen[0].fedavg_dino is True and seen[0].epochs == demo.DemoConfig.smoke_test().epochs
    assert seen[1].fedavg_dino is False  # off by default
