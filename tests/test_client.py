"""Client side: keygen and encode (CLI and msd_fast.client.encode), shard round trips, no labels, streaming, atomicity."""
import os
import stat

import numpy as np
import pytest
import torch

from msd_fast import Key
from msd_fast.cli.commands import main
from msd_fast.client.encode import client_subset, decrypt_shard, encode_dataset, make_key
from msd_fast.data import DataError, ImageSet, from_arrays, synthetic_dataset
from msd_fast.protocol.encryption import EncryptionSpec
from msd_fast.protocol.shard_sets import open_shards
from msd_fast.protocol.shards import open_shard
from msd_fast.protocol.token_embedding import TokenEmbedder

KEY = Key.from_secret(b"client test key")


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "consortium.key"
    KEY.save(path)
    return str(path)


# ---- keygen --------------------------------------------------------------------------------------------------------

def test_keygen_random_and_from_secret_file(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "a.key")]) == 0
    key = Key.load(tmp_path / "a.key")
    out = capsys.readouterr().out
    assert key.fingerprint in out and key._secret.hex() not in out
    assert stat.S_IMODE(os.stat(tmp_path / "a.key").st_mode) == 0o600

    (tmp_path / "shared.bin").write_bytes(b"thirty-two bytes shared offline!")
    for name in ("b.key", "c.key"):
        assert main(["keygen", "--out", str(tmp_path / name), "--secret-file", str(tmp_path / "shared.bin")]) == 0
    assert Key.load(tmp_path / "b.key") == Key.load(tmp_path / "c.key") == Key.from_secret(
        b"thirty-two bytes shared offline!")
    assert Key.load(tmp_path / "b.key") != key


def test_keygen_refuses_to_overwrite_and_rejects_empty_secrets(tmp_path, capsys):
    make_key(str(tmp_path / "k.key"))
    before = (tmp_path / "k.key").read_bytes()
    assert main(["keygen", "--out", str(tmp_path / "k.key")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "k.key").read_bytes() == before
    assert main(["keygen", "--out", str(tmp_path / "k.key"), "--force"]) == 0
    assert (tmp_path / "k.key").read_bytes() != before
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        make_key(str(tmp_path / "new.key"), secret_file=str(tmp_path / "empty"))
    assert not (tmp_path / "new.key").exists()


# ---- encode --------------------------------------------------------------------------------------------------------

def test_cli_encode_round_trip_without_labels(tmp_path, key_file, capsys):
    shard_path = tmp_path / "site-a.shard"
    assert main(["encode", "--key", key_file, "--data", "synthetic:40", "--image-size", "32", "--patch-size", "8",
                 "--scheme", "permute", "--no-per-sample", "--negpos", "--batch-size", "16", "--out", str(shard_path)]) == 0
    out = capsys.readouterr().out
    assert "encoded 40 images" in out and KEY.fingerprint in out and KEY._secret.hex() not in out
    shard = open_shard(shard_path)
    meta = shard.metadata
    assert (meta.mode, meta.count, meta.item_shape, meta.dtype, meta.patch_size) == ("image", 40, (1, 32, 32),
                                                                                      "uint8", 8)
    assert meta.client == "site-a" and meta.key_fingerprint == KEY.fingerprint
    assert meta.encryption == {"scheme": "permute", "block_scramble": True, "pixel_shuffle": True, "negpos": True,
                               "max_value": 255.0, "per_sample": False}
    original = synthetic_dataset(40, size=32)
    assert not torch.equal(shard[0:40], original.to_tensor())
    assert torch.equal(decrypt_shard(shard, KEY), original.to_tensor())
    # no labels anywhere: not as a tensor, not in the metadata, not as class names in the bytes
    raw = shard_path.read_bytes()
    assert b"label" not in raw.lower() and all(name.encode() not in raw for name in original.class_names)
    assert "label" not in meta.to_json().lower()


def test_cli_encode_default_is_the_dense_transform(tmp_path, key_file, capsys):
    shard_path = tmp_path / "dense.shard"
    assert main(["encode", "--key", key_file, "--data", "synthetic:20", "--image-size", "32", "--patch-size", "8",
                 "--out", str(shard_path)]) == 0
    assert "dense transform + per-sample block order (float16)" in capsys.readouterr().out
    shard = open_shard(shard_path)
    assert shard.metadata.dtype == "float16" and shard.metadata.item_shape == (1, 32, 32)
    record = dict(shard.metadata.encryption)
    assert 0 <= record.pop("sample_id_start") < 2**62
    assert record == {"scheme": "dense", "block_scramble": True, "per_sample": True, "max_value": 255.0,
                      "cipher_dtype": "float16"}
    original = synthetic_dataset(20, size=32).to_tensor()
    assert torch.equal(decrypt_shard(shard, KEY), original)  # float16 rounding never reaches half a grey level
    # the ciphertext is centred and mixed: no value is a pixel, and every block keeps its norm
    blocks = shard[0:20].double().reshape(20, 4, 8, 4, 8).permute(0, 1, 3, 2, 4).reshape(20, 16, 64)
    plain = (original.double() / 255 - 0.5).reshape(20, 4, 8, 4, 8).permute(0, 1, 3, 2, 4).reshape(20, 16, 64)
    torch.testing.assert_close(blocks.norm(dim=2).sort(dim=1).values, plain.norm(dim=2).sort(dim=1).values,
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("scheme", ["dense", "permute"])
def test_per_sample_and_token_modes_round_trip(tmp_path, scheme):
    images = synthetic_dataset(12, size=32, channels=3)
    spec = EncryptionSpec(scheme=scheme, per_sample=True, pixel_shuffle=scheme == "permute")
    meta = encode_dataset(images, KEY, str(tmp_path / "ps.shard"), patch_size=8, encryption=spec,
                          sample_id_start=5, batch_size=5)
    assert meta.encryption["per_sample"] and meta.encryption["sample_id_start"] == 5
    assert torch.equal(decrypt_shard(str(tmp_path / "ps.shard"), KEY), images.to_tensor())

    meta = encode_dataset(images, KEY, str(tmp_path / "tok.shard"), patch_size=8, mode="token", embed_dim=24,
                          token_dtype="float32", batch_size=5)
    assert (meta.mode, meta.item_shape, meta.dtype, meta.channels) == ("token", (16, 24), "float32", 3)
    assert meta.encryption["embed_dim"] == 24 and 0 <= meta.encryption["sample_id_start"] < 2**62
    embedder = TokenEmbedder.from_key(KEY, patch_size=8, in_chans=3, image_size=(32, 32), embed_dim=24)
    with torch.no_grad():
        expected = embedder(images.to_tensor())
    shard = open_shard(tmp_path / "tok.shard")
    assert not torch.equal(shard[0:12], expected)  # permuted per image
    assert torch.equal(decrypt_shard(shard, KEY), expected)
    assert torch.equal(decrypt_shard(shard, KEY, [3, 7]), expected[[3, 7]])
    with pytest.raises(ValueError, match="not with this key"):
        decrypt_shard(shard, Key.from_secret(b"another key"))


class _CountingReader:
    """A lazy source that records every read (to check that encoding streams in batches)."""

    def __init__(self, images):
        self.images, self.reads = images, []
        self.geometry = tuple(images.shape[1:])

    def __len__(self):
        return len(self.images)

    def read(self, rows):
        self.reads.append(len(rows))
        if len(self.reads) == 3 and getattr(self, "fail", False):
            raise OSError("disk went away")
        return self.images[torch.from_numpy(rows)]

    def describe(self):
        return "counting reader"


def test_encode_streams_batches_with_a_progress_bar_off_a_terminal(tmp_path, capsys):
    reader = _CountingReader(synthetic_dataset(50, size=16).to_tensor())
    meta = encode_dataset(ImageSet(reader), KEY, str(tmp_path / "s.shard"), patch_size=4, batch_size=8, progress=True)
    assert reader.reads == [8, 8, 8, 8, 8, 8, 2] and meta.count == 50
    err = capsys.readouterr().err
    assert "50/50" in err and "100%" in err  # tqdm writes to the captured (non-tty) stderr without failing
    assert torch.equal(decrypt_shard(str(tmp_path / "s.shard"), KEY), reader.images)
    encode_dataset(ImageSet(reader), KEY, str(tmp_path / "quiet.shard"), patch_size=4, batch_size=8)
    assert capsys.readouterr().err == ""  # default: no bar off a terminal


def test_a_failure_mid_stream_leaves_nothing_behind(tmp_path):
    reader = _CountingReader(synthetic_dataset(40, size=16).to_tensor())
    reader.fail = True
    with pytest.raises(OSError, match="disk went away"):
        encode_dataset(ImageSet(reader), KEY, str(tmp_path / "s.shard"), patch_size=4, batch_size=8)
    assert os.listdir(tmp_path) == []


def test_simulated_clients_make_compatible_shards(tmp_path, key_file, capsys):
    data = synthetic_dataset(60, size=16)
    paths = []
    for mode in ("image", "token"):
        for i in range(3):
            path = str(tmp_path / f"{mode}{i}.shard")
            args = ["encode", "--key", key_file, "--data", "synthetic:60", "--image-size", "16", "--patch-size", "4",
                    "--clients", "3", "--client-index", str(i), "--alpha", "0.5", "--seed", "7", "--mode", mode,
                    "--embed-dim", "8", "--out", path]
            if mode == "image":
                args.append("--per-sample")
            assert main(args) == 0, capsys.readouterr().err
            paths.append(path)
        shards, _ = open_shards(paths[-3:])  # random per-client sample-id starts do not make them incompatible
        counts = [len(s) for s in shards]
        assert sum(counts) == 60 and counts == [len(client_subset(data, 3, i, alpha=0.5, seed=7)) for i in range(3)]
    starts = {open_shard(p).metadata.encryption["sample_id_start"] for p in paths}
    assert len(starts) == 6


@pytest.mark.parametrize("extra, message", [
    (["--patch-size", "12"], "patch size 12 does not divide the image size 32x32.*--image-size 36"),
    (["--clients", "3"], "--clients N and --client-index i go together"),
    (["--clients", "3", "--client-index", "3"], r"--client-index must be in \[0, 3\)"),
    (["--scheme", "permute", "--no-per-sample", "--no-block-scramble", "--no-pixel-shuffle"], "plain images"),
    (["--no-block-scramble"], "need block scrambling"),
    (["--mode", "token", "--negpos"], "--negpos only apply to --mode image"),
    (["--negpos"], "--negpos belongs to --scheme permute"),
    (["--data", "nowhere/at/all"], "no such file or folder"),
])
def test_cli_encode_errors_are_one_clear_line(tmp_path, key_file, capsys, extra, message):
    args = ["encode", "--key", key_file, "--data", "synthetic:8", "--image-size", "32", "--patch-size", "8",
            "--out", str(tmp_path / "x.shard")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("msd-fast encode: error: ") and err.count("\n") == 1
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "x.shard").exists()


def test_encode_refuses_to_overwrite_and_unlabeled_alpha(tmp_path, key_file, capsys):
    args = ["encode", "--key", key_file, "--data", "synthetic:8", "--image-size", "16", "--patch-size", "4",
            "--out", str(tmp_path / "x.shard")]
    assert main(args) == 0
    before = (tmp_path / "x.shard").read_bytes()
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert (tmp_path / "x.shard").read_bytes() == before
    assert main(args + ["--force", "--no-per-sample"]) == 0 and (tmp_path / "x.shard").read_bytes() != before
    unlabeled = from_arrays(np.zeros((6, 8, 8), np.uint8))
    with pytest.raises(DataError, match="needs labels"):
        client_subset(unlabeled, 2, 0, alpha=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, options", [
    ("image", {}), ("image", {"encryption": EncryptionSpec(per_sample=True, cipher_dtype="float32")}),
    ("image", {"encryption": EncryptionSpec("permute", per_sample=True, pixel_shuffle=True, negpos=True)}),
    ("token", {"token_dtype": "float32", "embed_dim": 32})])
def test_encode_on_cuda_matches_cpu(tmp_path, mode, options):
    data = synthetic_dataset(70, size=32, channels=3)
    common = dict(patch_size=8, mode=mode, sample_id_start=3, batch_size=32, **options)
    cpu = encode_dataset(data, KEY, str(tmp_path / "cpu.shard"), **common)
    gpu = encode_dataset(data, KEY, str(tmp_path / "gpu.shard"), device="cuda", **common)
    if mode == "image":
        if gpu.dtype == "uint8":  # permutations are bit-exact on every backend
            assert gpu.checksum == cpu.checksum
        else:  # the dense transform is a float sum: equal to rounding
            torch.testing.assert_close(open_shard(str(tmp_path / "gpu.shard"))[:].float(),
                                       open_shard(str(tmp_path / "cpu.shard"))[:].float(), rtol=2e-3, atol=2e-3)
        assert torch.equal(decrypt_shard(str(tmp_path / "gpu.shard"), KEY), data.to_tensor())
    else:
        torch.testing.assert_close(open_shard(tmp_path / "gpu.shard")[0:70], open_shard(tmp_path / "cpu.shard")[0:70],
                                   atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("extra, weak", [([], False), (["--no-per-sample"], True),
                                         (["--scheme", "permute", "--no-per-sample"], True),
                                         (["--scheme", "permute"], True)])
def test_weak_encryption_prints_one_warning_naming_what_the_audit_recovers(tmp_path, key_file, capsys, extra, weak):
    assert main(["encode", "--key", key_file, "--data", "synthetic:8", "--image-size", "16", "--patch-size", "4",
                 "--out", str(tmp_path / "x.shard")] + extra) == 0
    warnings_printed = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    if weak:
        assert len(warnings_printed) == 1 and "weak encryption" in warnings_printed[0]
        assert "SECURITY.md" in warnings_printed[0] and ("statistics attack" in warnings_printed[0]
                                                          or "recovers" in warnings_printed[0])
    else:
        assert warnings_printed == []
