"""What the server's learning additions must keep: augmentations that commute with the encryption, the MSN-style
teacher on all tokens, collapse signals that detect collapse, and a monitor that is logged every epoch."""
import json

import pytest
import torch

from msd_fast import EncryptionSpec, Key, decrypt_blocks, encrypt_blocks, encrypt_patches
from msd_fast.server import pretrain
from msd_fast.server.augment import commuting_augmentation, contrast_about_midgrey
from msd_fast.server.monitor import collapse_signals, effective_rank, entropy
from msd_fast.server.trainer import Pretraining

from test_pretrain import shards, tiny_config  # noqa: F401  (module fixture)

KEY = Key.from_secret(b"augmentation test key")


@pytest.mark.parametrize("negpos", [True, False])
def test_contrast_about_midgrey_commutes_with_the_encryption(negpos):
    images = torch.randint(0, 256, (5, 3, 12, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor([0.6, 1.0, 1.37, 0.91, 1.2])
    options = dict(negpos=negpos, max_value=255.0)
    on_server = contrast_about_midgrey(encrypt_patches(images, KEY, 4, **options), scale, 127.5)
    at_client = encrypt_patches(contrast_about_midgrey(images, scale, 127.5).double(), KEY, 4, **options)
    torch.testing.assert_close(on_server.double(), at_client, rtol=0, atol=1e-4)


def test_dense_scheme_augmentations_commute_in_ciphertext_units():
    """Mid-grey is the dense ciphertext's 0: contrast about it, then decrypting, is contrast about mid-grey."""
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    spec = EncryptionSpec()
    midgrey, value_range = spec.ciphertext_units()
    scale = torch.tensor([0.7, 1.0, 1.25, 0.9])
    cipher = encrypt_blocks(images, KEY, 4, out_dtype=torch.float64)
    on_server = contrast_about_midgrey(cipher.double(), scale, midgrey).double()
    at_client = encrypt_blocks(contrast_about_midgrey(images, scale, 127.5).double(), KEY, 4, max_value=255.0,
                               out_dtype=torch.float64)
    torch.testing.assert_close(on_server, at_client, rtol=0, atol=1e-5)
    # noise of std `noise * value_range` in ciphertext units is noise of std `noise * 255` on the pixels
    noise = commuting_augmentation(torch.zeros(2000, 1, 4, 4), contrast=0.0, noise=0.05, midgrey=midgrey,
                                   value_range=value_range, generator=torch.Generator().manual_seed(5),
                                   global_batch=2000, first=0)
    pixels = decrypt_blocks(noise, KEY, 4, max_value=255.0, out_dtype=torch.float64) - 127.5
    assert abs(float(pixels.std()) - 0.05 * 255) < 0.3


def test_a_shift_of_brightness_would_not_commute():
    """The reason brightness is not offered: with negative-positive blocks a shift moves values both ways."""
    images = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(2)).double()
    shifted = encrypt_patches(images + 10, KEY, 4, negpos=True, max_value=255.0)
    assert not torch.allclose(encrypt_patches(images, KEY, 4, negpos=True, max_value=255.0) + 10, shifted)


def test_augmentation_is_drawn_for_the_global_batch_and_sliced():
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))

    def draw(rows, first):
        return commuting_augmentation(images[rows], contrast=0.4, noise=0.05, midgrey=127.5, value_range=255.0,
                                      generator=torch.Generator().manual_seed(7), global_batch=8, first=first)
    whole = draw(slice(0, 8), 0)
    torch.testing.assert_close(torch.cat([draw(slice(0, 4), 0), draw(slice(4, 8), 4)]), whole)
    assert not torch.equal(whole, images.float())
    plain = commuting_augmentation(images, contrast=0.0, noise=0.0, midgrey=127.5, value_range=255.0,
                                   generator=torch.Generator().manual_seed(7), global_batch=8, first=0)
    torch.testing.assert_close(plain, images.float())


def test_effective_rank_and_entropy_reference_values():
    line = torch.randn(200, 1, dtype=torch.float64) * torch.randn(1, 16, dtype=torch.float64)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    basis = torch.randn(64, 17, dtype=torch.float64)
    basis[:, 0] = 1  # the other 16 orthonormal columns are then orthogonal to the constant: zero mean
    isotropic = torch.linalg.qr(basis)[0][:, 1:] * 10
    assert effective_rank(isotropic) == pytest.approx(16.0, rel=1e-6)
    uniform = torch.full((3, 50), 1 / 50)
    torch.testing.assert_close(entropy(uniform), torch.full((3,), torch.log(torch.tensor(50.0)).item()))
    assert float(entropy(torch.eye(5)).max()) == pytest.approx(0.0, abs=1e-20)


def test_collapse_signals_see_a_collapsed_head(shards, tmp_path):  # noqa: F811
    run = Pretraining(tiny_config(shards, tmp_path / "run"))
    inputs = run.data.take(torch.arange(32))
    healthy = collapse_signals(run.teacher, inputs, run.loss.center, 0.04)
    assert 0 < healthy["teacher_entropy"] < healthy["uniform_entropy"] and healthy["effective_rank"] > 2
    with torch.no_grad():  # every output prototype the same vector: the teacher predicts a uniform distribution
        run.teacher.head.last_layer.weight_v.copy_(run.teacher.head.last_layer.weight_v[:1].expand_as(
            run.teacher.head.last_layer.weight_v))
    collapsed = collapse_signals(run.teacher, inputs, run.loss.center, 0.04)
    assert collapsed["teacher_entropy"] == pytest.approx(collapsed["uniform_entropy"], rel=1e-4)
    assert run.teacher.training  # restored


def test_teacher_on_all_tokens_and_the_monitor_are_logged(shards, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    original = Pretraining.train_step

    def spy(self, inputs, epoch, step):
        calls = []
        teacher_forward = self.teacher.forward
        self.teacher.forward = lambda x, views, **options: (calls.append([v.shape for v in views])
                                                            or teacher_forward(x, views, **options))
        try:
            return original(self, inputs, epoch, step)
        finally:
            self.teacher.forward = teacher_forward
            seen.extend(calls)

    monkeypatch.setattr(Pretraining, "train_step", spy)
    epochs = []
    config = tiny_config(shards, tmp_path / "all", teacher_views="all", contrast=0.3, noise=0.02, epochs=2)
    summary = pretrain(config, monitor=lambda teacher, epoch: epochs.append(epoch) or {"monitor_knn": 0.5})
    n_tokens = (32 // 4) ** 2
    assert seen and all(shapes == [torch.Size([1, 16, n_tokens])] for shapes in seen)
    assert epochs == [0, 1]
    for record in summary["history"]:
        assert record["monitor_knn"] == 0.5
        assert {"teacher_entropy", "usage_entropy", "feature_std", "effective_rank"} <= set(record)
    logged = [json.loads(line) for line in open(tmp_path / "all" / "log.jsonl")]
    assert [r["monitor_knn"] for r in logged if r["event"] == "epoch"] == [0.5, 0.5]


def test_new_settings_are_checked(shards, tmp_path):  # noqa: F811
    for change, message in ((dict(teacher_views="some"), "--teacher-views"), (dict(contrast=1.5), "--contrast"),
                            (dict(noise=-0.1), "--noise")):
        with pytest.raises(ValueError, match=message):
            tiny_config(shards, tmp_path, **change)
