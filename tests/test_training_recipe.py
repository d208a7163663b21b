"""The few-label fine-tuning recipe: the client's validation split, selection of the step on it (never the test
set), the linear-probe start, layer-wise learning-rate decay and the recipe's own checks."""
import pytest
import torch

from msd_fast.evaluation.probe import fit_linear_classifier, linear_probe_probabilities
from msd_fast.client.finetune import (Recipe, extract_features, fit_head, parameter_groups, predict,
                                          train_classifier, validation_split)

from test_downstream import tiny_classifier


def test_validation_split_is_stratified_disjoint_and_keeps_every_class_in_training():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 4)
    train, val = validation_split(labels, 0.2, min_val=3, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(20))
    assert torch.bincount(labels[val], minlength=4).tolist() == [2, 1, 0, 1]
    assert set(labels[train].tolist()) == {0, 1, 2, 3}
    assert torch.equal(validation_split(labels, 0.2, min_val=3, seed=0)[1], val)  # seeded
    every, none = validation_split(labels, 0.2, min_val=5, seed=0)
    assert none is None and every.tolist() == list(range(20))
    assert validation_split(labels, 0.0, min_val=1, seed=0)[1] is None


def test_the_step_with_the_best_validation_score_is_kept():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 32, 32), dtype=torch.uint8)
    labels = torch.arange(12) % 5
    model = tiny_classifier()
    snapshots, scores = {}, iter([0.1, 0.5, 0.9, 0.2, 0.3])

    def validate(m):
        score = next(scores)
        snapshots[score] = {k: v.clone() for k, v in m.state_dict().items()}
        return score

    recipe = Recipe(steps=40, batch_size=4, eval_every=10, seed=1)
    info = train_classifier(model, images, labels, recipe, device=torch.device("cpu"), validate=validate)
    # step 0 is the linear probe (0.1), then steps 10, 20, 30, 40 (0.5, 0.9, 0.2, 0.3): step 20 is kept.
    assert info == {"steps": 40, "selected_step": 20, "val_score": 0.9}
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[0.9][name]), name


def test_linear_probe_start_equals_the_probe_and_folds_the_standardisation():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=generator) * torch.tensor([1, 5, 0.1, 2, 3, 1]) + 7
    labels = (features[:, 1] > 7).long() + 2 * (features[:, 3] > 7).long()
    weight, bias = fit_linear_classifier(features, labels, 4)
    mean, std = features.double().mean(0), features.double().std(0)
    standardised = fit_linear_classifier((features - mean.float()) / std.float(), labels, 4)
    torch.testing.assert_close(features.double() @ weight.T + bias,
                               ((features.double() - mean) / std) @ standardised[0].T + standardised[1],
                               rtol=1e-5, atol=1e-5)
    model = tiny_classifier(n_classes=4)
    images = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8, generator=generator)
    image_labels = torch.arange(16) % 4
    fit_head(model, images, image_labels, device=torch.device("cpu"))
    features = extract_features(model, images, device=torch.device("cpu"))
    probe = linear_probe_probabilities(features, image_labels, features, 4)
    torch.testing.assert_close(predict(model, images, device=torch.device("cpu")), probe, rtol=1e-4, atol=1e-4)


def test_layer_decay_scales_pretrained_layers_only():
    model = tiny_classifier(depth=2)
    recipe = Recipe(layer_decay=0.5)
    scales = {}
    for group in parameter_groups(model, recipe, pretrained=True):
        for param in group["params"]:
            scales[param] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert scales[named["vit.patch_embed.proj.weight"]] == (0.125, 0.05)
    assert scales[named["vit.pos_embed"]] == (0.125, 0.0)
    assert scales[named["vit.blocks.0.attn.qkv.weight"]][0] == 0.25
    assert scales[named["vit.blocks.1.attn.qkv.bias"]] == (0.5, 0.0)
    assert scales[named["vit.head.weight"]] == (1.0, 0.05)
    assert all(g["lr_scale"] == 1.0 for g in parameter_groups(model, recipe, pretrained=False))
    assert sum(len(g["params"]) for g in parameter_groups(model, recipe, pretrained=True)) == len(named)


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps"), (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(layer_decay=1.5), "layer_decay"),
    (dict(val_fraction=1.0), "val_fraction"), (dict(warmup_steps=400), "warmup_steps"),
    (dict(label_smoothing=1.0), "label_smoothing"), (dict(batch_size=True), "batch_size")])
def test_bad_recipes_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**change)


def _client_split(n_train=40, n_test=12, seed=0):
    from msd_fast.evaluation import LabelledSplit

    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_train + n_test, 1, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n_train + n_test) % 4
    return LabelledSplit(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], 4)


@pytest.mark.parametrize("refit", [True, False])
def test_the_head_is_refitted_on_every_labelled_image_after_selection(refit):
    from msd_fast.evaluation import finetune_and_evaluate

    split = _client_split()
    recipe = Recipe(steps=6, batch_size=4, eval_every=3, refit_head=refit, seed=2)
    model = tiny_classifier(n_classes=4)
    metrics = finetune_and_evaluate(model, split, recipe, device=torch.device("cpu"))
    assert metrics["n_val"] == 8  # a fifth of 40 held out to select the step
    # The refit head is the logistic regression on the selected body's features of all 40 labelled images (the 8
    # held-out ones included); without the refit, it is the head of the selected step, trained on 32 of them.
    features = extract_features(model, split.train_images, device=torch.device("cpu"))
    weight, bias = fit_linear_classifier(features, split.train_labels, 4)
    matches = torch.allclose(model.vit.head.weight.double(), weight.to(torch.float32).double(), atol=1e-5) and \
        torch.allclose(model.vit.head.bias.double(), bias.to(torch.float32).double(), atol=1e-5)
    assert matches == refit
    probabilities = predict(model, split.test_images, device=torch.device("cpu"))
    assert metrics["accuracy"] == float((probabilities.argmax(1) == split.test_labels).double().mean())
