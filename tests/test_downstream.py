"""Downstream evaluation (msd_fast.evaluation): metrics against brute force, FedAvg aggregation and communication
from the serialised payload, frozen-feature probes with known answers, and the client's classifiers built from an
exported backbone (plain domain == encrypted domain exactly, wrong key refused, token mode, fine-tuning, probes)."""
import copy
import json
import math
import struct
import sys

import pytest
import torch
from safetensors.torch import save as safetensors_save

from msd_fast import Key, permute_tokens
from msd_fast.data import synthetic_dataset
from msd_fast.data.synthetic import CLASS_NAMES
from msd_fast.client import Recipe, exported_architecture, pretrained_classifier, random_classifier
from msd_fast.evaluation import (FedAvgSettings, LabelledSplit, build_classifier, classification_metrics, fedavg,
                                 finetune_and_evaluate, probe, state_dict_bytes, weighted_average)
from msd_fast.evaluation.metrics import binary_auc, confusion_matrix
from msd_fast.evaluation.probe import knn_probabilities, linear_probe_probabilities
from msd_fast.client.finetune import standardisation
from msd_fast.server import load_exported
from msd_fast.server.export import read_export_metadata
from msd_fast.vit import forward_views

TINY = dict(arch="vit_tiny_patch16_224", image_size=(32, 32), patch_size=8, in_chans=1, depth=1, embed_dim=24,
            num_heads=2)


@pytest.fixture(scope="module")
def key(exported_backbones):
    return Key.from_secret(exported_backbones["secret"])


@pytest.fixture(scope="module")
def split():
    """48 labelled training scans and 16 held-out ones (32x32, the synthetic set's 7 classes), as a client would
    have them."""
    train, test = synthetic_dataset(48, size=32), synthetic_dataset(16, size=32, split="test")
    return LabelledSplit(train.to_tensor(), train.labels, test.to_tensor(), test.labels, len(CLASS_NAMES))


# ---- metrics -------------------------------------------------------------------------------------------------------

def one_hot_scores(predicted, n_classes):
    return torch.nn.functional.one_hot(torch.tensor(predicted), n_classes).float() * 0.8 + 0.04


def test_accuracy_balanced_accuracy_and_confusion_on_a_hand_made_case():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = [0, 0, 0, 1, 1, 0, 2, 1]
    metrics = classification_metrics(one_hot_scores(predicted, 3), labels)
    assert metrics["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)  # not the accuracy: imbalanced
    assert metrics["n"] == 8
    assert torch.equal(confusion_matrix(labels, torch.tensor(predicted), 3), torch.tensor(metrics["confusion_matrix"]))


def brute_force_auc(scores, positive):
    """Probability that a random positive scores above a random negative, ties counting one half."""
    pos, neg = scores[positive].tolist(), scores[~positive].tolist()
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_binary_auc_is_the_pairwise_count_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (37,), generator=generator).float() / 4  # few distinct values: many ties
    positive = torch.rand(37, generator=generator) < 0.4
    assert binary_auc(scores, positive) == pytest.approx(brute_force_auc(scores, positive), abs=1e-12)


def test_binary_auc_edge_cases():
    positive = torch.tensor([True, True, False, False])
    assert binary_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), positive) == 1.0
    assert binary_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), positive) == 0.0
    assert binary_auc(torch.full((4,), 0.5), positive) == 0.5
    assert math.isnan(binary_auc(torch.rand(4), torch.ones(4, dtype=torch.bool)))


def test_macro_auc_skips_absent_classes_and_balanced_accuracy_uses_present_ones():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])  # class 3 never occurs
    probabilities = torch.rand(10, 4, generator=generator).softmax(dim=1)
    metrics = classification_metrics(probabilities, labels)
    expected = sum(brute_force_auc(probabilities[:, c], labels == c) for c in range(3)) / 3
    assert metrics["macro_auc"] == pytest.approx(expected, abs=1e-12)
    matrix = torch.tensor(metrics["confusion_matrix"])
    assert matrix[3].sum() == 0 and matrix.sum() == 10
    recalls = [float(matrix[c, c] / matrix[c].sum()) for c in range(3)]
    assert metrics["balanced_accuracy"] == pytest.approx(sum(recalls) / 3)


def test_metrics_reject_mismatched_shapes_and_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        classification_metrics(torch.rand(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="probabilities must be"):
        classification_metrics(torch.rand(4, 3), torch.tensor([0, 1, 2]))


# ---- frozen-feature probes -----------------------------------------------------------------------------------------

def clusters(n_per_class, n_classes, dim, spread, seed):
    """Points around ``n_classes`` orthogonal unit directions (well separated for a small ``spread``)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    centres = torch.eye(dim)[:n_classes] * 5
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def test_knn_on_well_separated_clusters_is_perfect():
    train, train_labels = clusters(10, 3, 6, 0.3, seed=0)
    test, test_labels = clusters(5, 3, 6, 0.3, seed=1)
    probabilities = knn_probabilities(train, train_labels, test, 3, k=20)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(test)))
    assert classification_metrics(probabilities, test_labels)["accuracy"] == 1.0


def test_knn_votes_with_temperature_weighted_cosine_similarity():
    train = torch.tensor([[1.0, 0.0], [2.0, 0.2], [0.0, 3.0], [-1.0, 0.0]])  # cosine: scale does not matter
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 1.0]])
    similarity = torch.nn.functional.normalize(train, dim=1) @ torch.nn.functional.normalize(query, dim=1).T
    weights = (similarity[:, 0] / 0.07).exp()
    top3 = similarity[:, 0].topk(3).indices  # the opposite vector (-1, 0) is left out with k = 3
    expected = torch.zeros(2).index_add_(0, labels[top3], weights[top3])
    probabilities = knn_probabilities(train, labels, query, 2, k=3, center=False)
    torch.testing.assert_close(probabilities[0], expected / expected.sum())
    assert 3 not in top3.tolist()
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_probabilities(train, labels, query, 2, k=0)


def test_linear_probe_on_separable_features_is_perfect_and_deterministic():
    train, train_labels = clusters(12, 3, 5, 0.5, seed=2)
    test, test_labels = clusters(6, 3, 5, 0.5, seed=3)
    first = linear_probe_probabilities(train, train_labels, test, 3)
    assert classification_metrics(first, test_labels)["accuracy"] == 1.0
    assert torch.equal(first, linear_probe_probabilities(train, train_labels, test, 3))


# ---- FedAvg and communication --------------------------------------------------------------------------------------

def test_weighted_average_is_the_weighted_mean_in_float64():
    generator = torch.Generator().manual_seed(0)
    states = [{"weight": torch.randn(3, 4, generator=generator),
               "half": torch.randn(5, generator=generator).half(),
               "counter": torch.tensor(7 + i, dtype=torch.int64)} for i in range(3)]
    weights = [1, 2, 5]
    averaged = weighted_average(states, weights)
    for name in ("weight", "half"):
        manual = sum(w * s[name].double() for w, s in zip(weights, states)) / sum(weights)
        assert averaged[name].dtype == states[0][name].dtype
        # The only error allowed is the final rounding to the entry's dtype (half an ulp; one ulp for safety).
        ulp = torch.finfo(states[0][name].dtype).eps
        torch.testing.assert_close(averaged[name].double(), manual, rtol=ulp, atol=0)
    assert averaged["counter"].dtype == torch.int64 and int(averaged["counter"]) == 7  # integers: the first state's
    assert averaged["counter"] is not states[0]["counter"]
    torch.testing.assert_close(weighted_average(states, [0, 1, 0])["weight"], states[1]["weight"], rtol=0, atol=0)


def test_weighted_average_rejects_inconsistent_states_and_weights():
    state = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="equal length"):
        weighted_average([state, state], [1])
    with pytest.raises(ValueError, match=">= 0"):
        weighted_average([state, state], [2, -1])
    with pytest.raises(ValueError, match="other entries"):
        weighted_average([state, {"v": torch.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([state, {"w": torch.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        FedAvgSettings(rounds=0)
    with pytest.raises(ValueError, match="client_fraction"):
        FedAvgSettings(client_fraction=1.5)


def tiny_classifier(n_classes=len(CLASS_NAMES), seed=0, **changes):
    arch = dict(TINY, **changes)
    return random_classifier(arch.pop("arch"), n_classes, mean=100.0, std=50.0, seed=seed, **arch)


def test_state_dict_bytes_is_the_serialised_safetensors_payload():
    model = tiny_classifier()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    payload = safetensors_save(tensors)
    assert state_dict_bytes(model) == len(payload)
    # safetensors: an 8-byte header length, the JSON header, then every tensor's raw bytes.
    header = struct.unpack("<Q", payload[:8])[0]
    assert set(json.loads(payload[8:8 + header])) >= set(tensors)
    assert len(payload) == 8 + header + sum(v.numel() * v.element_size() for v in tensors.values())
    assert state_dict_bytes(tiny_classifier(embed_dim=48)) > state_dict_bytes(model)
    assert state_dict_bytes(tiny_classifier(depth=2)) > state_dict_bytes(model)


def test_fedavg_aggregates_local_models_weighted_by_client_size(monkeypatch):
    """With local training replaced by "add the client's number to every weight", the global model after each round
    is the init plus the size-weighted mean of those numbers, and every sampled client is counted once per round."""
    def fake_training(model, images, labels, recipe, **_):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(len(images) / 100)  # client sizes 6 and 10 -> +0.06 / +0.10
        return model

    monkeypatch.setattr(sys.modules["msd_fast.evaluation.fedavg"], "train_classifier", fake_training)
    clients = [(torch.zeros(n, 1, 32, 32, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64)) for n in (6, 10)]
    init = tiny_classifier()
    model, traffic = fedavg(lambda: copy.deepcopy(init), clients, Recipe(), FedAvgSettings(rounds=3),
                            device=torch.device("cpu"))
    step = (6 * 0.06 + 10 * 0.10) / 16
    for (name, after), before in zip(model.named_parameters(), init.parameters()):
        torch.testing.assert_close(after, before + 3 * step, msg=name)
    payload = state_dict_bytes(init)
    assert (traffic.upload_bytes, traffic.download_bytes, traffic.rounds) == (3 * payload, 3 * payload, 3)

    _, sampled = fedavg(lambda: copy.deepcopy(init), clients, Recipe(),
                        FedAvgSettings(rounds=4, client_fraction=0.5), device=torch.device("cpu"))
    assert sampled.upload_bytes == sampled.download_bytes == 2 * payload  # 4 rounds x 1 of 2 clients = 2 per client


def test_fedavg_with_two_tiny_clients_trains_and_counts_the_payload(split):
    halves = [(split.train_images[i::2], split.train_labels[i::2]) for i in range(2)]
    init = tiny_classifier()
    model, traffic = fedavg(lambda: copy.deepcopy(init), halves, Recipe(batch_size=16),
                            FedAvgSettings(rounds=2, local_steps=2), device=torch.device("cpu"))
    assert traffic.upload_bytes == traffic.download_bytes == 2 * state_dict_bytes(model)
    assert traffic.total_bytes == 4 * state_dict_bytes(model) and traffic.rounds == 2
    assert not torch.equal(model.vit.head.weight, init.vit.head.weight)  # it trained
    with pytest.raises(ValueError, match="at least one client"):
        fedavg(lambda: copy.deepcopy(init), [], Recipe(), FedAvgSettings(), device=torch.device("cpu"))


def test_standardisation_streams_chunks_and_matches_the_float64_statistics():
    images = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = standardisation(images, chunk_size=7)
    assert mean == pytest.approx(float(images.double().mean()), rel=1e-12)
    assert std == pytest.approx(float(images.double().std()), rel=1e-12)


# ---- classifiers from an exported backbone -------------------------------------------------------------------------

def test_plain_domain_classifier_equals_the_encrypted_domain_one(exported_backbones, key, split):
    """decrypt_vit is exact: before any training, the decrypted model on plain images gives the logits of the
    pretrained model on the images the classifier encrypts with the key."""
    mean, std = standardisation(split.train_images)
    plain = pretrained_classifier(exported_backbones["image"], key, 5, mean=mean, std=std, domain="plain").eval()
    encrypted = pretrained_classifier(exported_backbones["image"], key, 5, mean=mean, std=std,
                                      domain="encrypted").eval()
    images = split.test_images
    with torch.no_grad():
        # The encrypted domain sees what the server saw: the float16 ciphertext of the dense transform (11
        # significant bits, relative rounding <= 2^-11 = 4.9e-4 per value); the plain domain skips that rounding.
        torch.testing.assert_close(plain(images), encrypted(images), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(plain.features(images), encrypted.features(images), rtol=1e-3, atol=1e-4)
        # ... and the key matters: the pretrained model on the plain images says something else.
        unencrypted = encrypted.vit(images.float())
        assert (unencrypted - encrypted(images)).abs().max() > 1e-2
    torch.testing.assert_close(plain.vit.head.weight, encrypted.vit.head.weight, rtol=0, atol=0)  # seeded head
    other = pretrained_classifier(exported_backbones["image"], key, 5, mean=mean, std=std, seed=1)
    assert not torch.equal(other.vit.head.weight, plain.vit.head.weight)


def test_the_wrong_key_is_refused_by_fingerprint(exported_backbones, key):
    wrong = Key.from_secret(b"another consortium")
    with pytest.raises(ValueError, match="not with this key") as error:
        pretrained_classifier(exported_backbones["image"], wrong, 5, mean=0.0, std=1.0)
    message = str(error.value)
    assert wrong.fingerprint in message and key.fingerprint in message
    assert exported_backbones["secret"].hex() not in message and "another consortium" not in message
    with pytest.raises(ValueError, match="domain must be one of"):
        pretrained_classifier(exported_backbones["image"], key, 5, mean=0.0, std=1.0, domain="cipher")


def test_a_foreign_file_is_not_an_exported_backbone(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a safetensors file"):
        read_export_metadata(str(tmp_path / "junk.safetensors"))
    (tmp_path / "plain.safetensors").write_bytes(safetensors_save({"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match="not an msd_fast exported backbone"):
        read_export_metadata(str(tmp_path / "plain.safetensors"))


def test_finetuning_is_reproducible_and_returns_every_metric(exported_backbones, key, split):
    recipe = Recipe(steps=4, batch_size=16, seed=3, probe_init=False)  # no step-0 candidate: the body must move
    runs = []
    for _ in range(2):
        classifier = build_classifier(split, model=exported_backbones["image"], key=key, seed=3)
        before = classifier.vit.blocks[0].attn.qkv.weight.detach().clone()
        metrics = finetune_and_evaluate(classifier, split, recipe, device=torch.device("cpu"))
        assert not torch.equal(before, classifier.vit.blocks[0].attn.qkv.weight)  # the backbone is fine-tuned
        runs.append((metrics, classifier.state_dict()))
    metrics = runs[0][0]
    assert set(metrics) == {"accuracy", "balanced_accuracy", "macro_auc", "confusion_matrix", "n", "selected_step",
                            "n_val"}
    assert metrics["n"] == 16 and torch.tensor(metrics["confusion_matrix"]).sum() == 16
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["balanced_accuracy"] <= 1 and 0 <= metrics["macro_auc"] <= 1
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name

    encrypted = build_classifier(split, model=exported_backbones["image"], key=key, domain="encrypted", seed=3)
    assert set(finetune_and_evaluate(encrypted, split, Recipe(steps=4, batch_size=16),
                                     device=torch.device("cpu"))) == set(metrics)


def test_probe_returns_knn_and_linear_metrics(exported_backbones, key, split):
    classifier = build_classifier(split, model=exported_backbones["image"], key=key)
    results = probe(classifier, split, device=torch.device("cpu"), k=5)
    assert set(results) == {"knn", "linear"}
    for metrics in results.values():
        assert metrics["n"] == 16 and torch.tensor(metrics["confusion_matrix"]).sum() == 16


def test_token_mode_classifier_runs_the_exported_blocks_on_the_key_embedded_tokens(exported_backbones, key, split):
    path = exported_backbones["token"]
    classifier = pretrained_classifier(path, key, len(CLASS_NAMES), mean=0.0, std=1.0).eval()
    images = split.test_images[:6]
    with torch.no_grad():
        logits, features = classifier(images), classifier.features(images)
        assert logits.shape == (6, len(CLASS_NAMES)) and features.shape == (6, 24)
        vit, tokens = classifier.vit, classifier.embedder(images)
        reference = vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(tokens)))))  # timm's own path
        torch.testing.assert_close(logits, reference)
        # The server trained on per-image permuted tokens: the class-token output does not depend on the order.
        shuffled = permute_tokens(tokens, key, list(range(6)))
        every = torch.arange(tokens.shape[1]).expand(1, 6, -1)
        torch.testing.assert_close(forward_views(vit, shuffled, every), logits, rtol=1e-5, atol=1e-5)
    metrics = finetune_and_evaluate(classifier, split, Recipe(steps=4, batch_size=16), device=torch.device("cpu"))
    assert metrics["n"] == 16


def test_random_init_baseline_is_the_same_network(exported_backbones, key, split):
    for mode in ("image", "token"):
        _, metadata = load_exported(exported_backbones[mode])
        pretrained = build_classifier(split, model=exported_backbones[mode], key=key)
        baseline = build_classifier(split, model=None, key=None, random_arch=exported_architecture(metadata))
        shapes = {k: v.shape for k, v in baseline.vit.state_dict().items()}
        expected = {k: v.shape for k, v in pretrained.vit.state_dict().items()}
        if mode == "token":  # the baseline sees plain images: it keeps timm's learned position embedding
            assert shapes.pop("pos_embed") == (1, 17, 24)
        assert shapes == expected
    with pytest.raises(ValueError, match="not a timm model name"):
        tiny_classifier(arch="vit_no_such_model")
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        random_classifier("resnet18", 5, image_size=(32, 32), patch_size=8, in_chans=1, mean=0.0, std=1.0)


def test_knn_centres_the_features_by_default():
    """Centring on the training mean makes the vote blind to a common offset of all features (which otherwise
    pushes every cosine similarity towards 1), and it is what the uncentred vote gives on pre-centred features."""
    train, train_labels = clusters(10, 3, 6, 0.3, seed=4)
    test, _ = clusters(5, 3, 6, 0.3, seed=5)
    offset = torch.tensor([30.0, -20.0, 10.0, 40.0, 5.0, -8.0])
    shifted = knn_probabilities(train + offset, train_labels, test + offset, 3, k=5, temperature=1.0)
    plain = knn_probabilities(train, train_labels, test, 3, k=5, temperature=1.0)
    torch.testing.assert_close(shifted, plain, rtol=1e-4, atol=1e-4)
    mean = train.mean(0)
    pre_centred = knn_probabilities(train - mean, train_labels, test - mean, 3, k=5, center=False, temperature=1.0)
    torch.testing.assert_close(shifted, pre_centred, rtol=1e-4, atol=1e-4)
