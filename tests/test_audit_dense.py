"""Audit of the dense block transform: the statistics attack beats chance, the known-plaintext attack recovers the
key matrix exactly with enough independent blocks (and says so when it cannot), quick_audit gives one line per
attack, and no attack receives the key."""
import inspect
import math

import pytest
import torch

from msd_fast import Key
from msd_fast.evaluation.audit.dense_known_plaintext import recover_block_matrix
from msd_fast.evaluation.audit.dense_study import set_psnr, true_orders
from msd_fast.evaluation.audit.quick import quick_audit
from msd_fast.evaluation.audit.statistics_attack import (block_moments, cipher_blocks, natural_image_blocks,
                                              public_blocks_from_images, statistics_attack, to_pixels)
from msd_fast.protocol.encryption import EncryptionSpec
from msd_fast.ops.patch_encryption import blocks_to_image

from test_audit import smooth_images

KEY = Key.from_secret(b"dense audit test key")


def _encrypt(x, spec, p=8):
    return spec.encrypt(x, KEY, p, sample_ids=torch.arange(len(x)), backend="reference")


def test_statistics_attack_beats_chance_on_structured_images():
    x, public = smooth_images(96, size=32, seed=1), smooth_images(96, size=32, seed=2)
    spec = EncryptionSpec(block_scramble=False, per_sample=False, cipher_dtype="float32")
    y = _encrypt(x, spec)
    result = statistics_attack(y, 8, public_blocks_from_images(public, 8))
    decoded = blocks_to_image(to_pixels(result.decode(cipher_blocks(y, 8))), 1, 32, 32, 8)
    chance = set_psnr(public.double().mean(0).expand_as(x), x)
    assert set_psnr(decoded, x) > chance + 3.0
    assert set_psnr(to_pixels(y.double()), x) < chance          # the ciphertext itself shows nothing
    assert 1 <= result.components <= 64


def test_statistics_building_blocks():
    blocks = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m = block_moments(blocks * torch.linspace(2, 0.5, 16, dtype=torch.float64))
    assert bool((m.eigenvalues[:-1] >= m.eigenvalues[1:]).all()) and m.coskew.shape == (16, 16)
    natural = natural_image_blocks(4, 1, scales=(8,))
    assert natural.shape[1] == 16 and float(natural.min()) >= -0.5 and float(natural.max()) <= 0.5
    with pytest.raises(ValueError, match="values per block"):
        statistics_attack(torch.zeros(2, 1, 8, 8), 4, torch.zeros(10, 9))


@pytest.mark.parametrize("per_sample", [False, True])
def test_known_plaintext_recovers_the_matrix_with_enough_independent_blocks(per_sample):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (8, 1, 16, 16), generator=g, dtype=torch.uint8)     # 4 blocks of 64 values each
    spec = EncryptionSpec(per_sample=per_sample, cipher_dtype="float32")
    y = _encrypt(x, spec)
    A = KEY.block_matrix(64)
    few = recover_block_matrix(x[:4], y[:4], 8, per_sample=per_sample)            # 16 blocks < 64
    assert not few.recovered and few.rank == 16 and float((few.matrix - A).norm() / A.norm()) > 0.5
    half = recover_block_matrix(x, y, 8, per_sample=per_sample)                     # 32 blocks < 64
    assert not half.recovered and half.rank == 32
    x2 = torch.randint(0, 256, (20, 1, 16, 16), generator=g, dtype=torch.uint8)
    y2 = _encrypt(x2, spec)
    found = recover_block_matrix(x2[:17], y2[:17], 8, per_sample=per_sample)     # 68 blocks >= 64
    assert found.recovered and found.rank == 64
    assert float((found.matrix - A).norm() / A.norm()) < 1e-3
    truth = true_orders(KEY, spec, 4, torch.arange(17))
    assert torch.equal(found.pair_src_block, truth)
    decoded = to_pixels(found.decode_blocks(y2[17:], 8)).round()
    expected = to_pixels(cipher_blocks(y2[17:], 8) @ A).round()
    assert torch.equal(decoded, expected)


def test_flat_and_repeated_blocks_do_not_count():
    x = torch.full((6, 1, 16, 16), 40, dtype=torch.uint8)
    x[:, :, :8, :8] = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(5),
                                    dtype=torch.uint8)
    y = _encrypt(x, EncryptionSpec(cipher_dtype="float32"))
    found = recover_block_matrix(x, y, 8, per_sample=False)
    assert found.rank == 7 and not found.recovered                                # 6 random blocks + one flat


@pytest.mark.parametrize("spec", [EncryptionSpec(per_sample=False), EncryptionSpec(per_sample=True),
                                  EncryptionSpec(scheme="permute", per_sample=False, pixel_shuffle=True, negpos=True)],
                         ids=["dense", "dense-per-sample", "permute"])
def test_quick_audit_one_line_per_attack(spec):
    x = smooth_images(24, size=32, seed=7)
    lines = []
    result = quick_audit(x, KEY, spec, 8, natural=spec.scheme == "dense", log=lines.append)
    expected = 3 if spec.scheme == "dense" else 2
    assert len(result.lines) == len(result.results["attacks"]) == expected
    assert all(" vs chance " in line and "PSNR" in line for line in result.lines)
    assert result.results["key_fingerprint"] == KEY.fingerprint and result.seconds < 60
    data = result.to_dict()
    assert data["description"] == spec.describe() and KEY._secret.hex() not in repr(data)
    with pytest.raises(TypeError, match="spec"):
        quick_audit(x, KEY, "dense", 8)


def test_attacks_never_receive_the_key():
    for attack in (statistics_attack, recover_block_matrix):
        assert "key" not in inspect.signature(attack).parameters


def test_cli_audit_one_configuration(tmp_path, capsys):
    import json

    from msd_fast.cli.commands import main

    assert main(["audit", "--data", "synthetic:24", "--patch-size", "8", "--scheme", "dense", "--per-sample",
                 "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "statistics attack" in out and "known plaintext" in out
    data = json.loads(open(tmp_path / "q" / "quick_audit.json").read())
    assert data["encryption"]["scheme"] == "dense" and data["encryption"]["per_sample"] is True
    assert not math.isnan(data["attacks"][0]["psnr"])
