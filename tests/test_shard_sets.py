"""Encodings larger than --max-shard-size: a folder of numbered shards plus index.json, written part by part,
resumed after an interruption (byte-for-byte the uninterrupted result), refused when the resumed parts came from
another key, encryption, sample-id range or data, and read lazily by the server."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from msd_fast import EncryptionSpec, Key
from msd_fast.cli import main
from msd_fast.client.encode import decrypt_shard, encode_dataset
from msd_fast.data import ImageSet, synthetic_dataset
from msd_fast.protocol.shard_sets import (INDEX_NAME, ConcatenatedShards, ShardSetIndex, open_shard_set, parse_size)
from msd_fast.protocol.shard_sets import open_shards
from msd_fast.protocol.shards import ShardError, open_shard
from msd_fast.server.data import ShardDataset

KEY = Key.from_secret(b"shard-set tests")
IMAGES = synthetic_dataset(45, size=16).to_tensor()  # float16 dense ciphertext: 512 bytes per image
PART = "4kB"  # 6 items of 512 bytes and a 632-byte header per part -> 7 parts of 6 and one of 3
PER_PART = 6


class Reader:
    """An ImageSet reader that counts the images it reads and fails when asked for row ``fail_at`` or later."""

    def __init__(self, images, fail_at=None):
        self.images, self.fail_at, self.read_count = images, fail_at, 0

    @property
    def geometry(self):
        return tuple(self.images.shape[1:])

    def __len__(self):
        return self.images.shape[0]

    def read(self, rows):
        if self.fail_at is not None and max(rows) >= self.fail_at:
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM in the CLI) raises mid-stream
        self.read_count += len(rows)
        return self.images[torch.from_numpy(np.asarray(rows))]

    def describe(self):
        return "test reader"


def encode(out, reader=None, **options):
    options = dict(dict(patch_size=4, batch_size=4, max_shard_size=PART, sample_id_start=1000), **options)
    return encode_dataset(ImageSet(reader or Reader(IMAGES)), KEY, str(out), **options)


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("100 kB") == 10**5 and parse_size(4096) == 4096 and parse_size("7") == 7
    for bad in ("two GB", "2XB", "-1GB", "0", 0, True, ""):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_data_larger_than_the_limit_becomes_numbered_parts_that_decrypt_alone_and_together(tmp_path):
    meta = encode(tmp_path / "set")
    index = json.loads((tmp_path / "set" / INDEX_NAME).read_text())
    names = [part["file"] for part in index["parts"]]
    assert index["complete"] and names == [f"part-{i:05d}.shard" for i in range(8)]
    assert sorted(os.listdir(tmp_path / "set")) == sorted(names + [INDEX_NAME])
    sizes = [os.path.getsize(tmp_path / "set" / n) for n in names]
    assert max(sizes) <= 4000 < sizes[0] + 512  # as many items per part as fit
    assert [part["count"] for part in index["parts"]] == [PER_PART] * 7 + [3] and meta.count == 45
    parts = open_shard_set(tmp_path / "set")
    assert [p.metadata.encryption["sample_id_start"] for p in parts] == [1000 + PER_PART * i for i in range(8)]
    assert torch.equal(decrypt_shard(parts[2].path, KEY), IMAGES[12:18])  # one part alone
    assert torch.equal(decrypt_shard(str(tmp_path / "set"), KEY), IMAGES)  # the folder
    assert torch.equal(decrypt_shard(str(tmp_path / "set"), KEY, [44, 3, 20]), IMAGES[[44, 3, 20]])
    assert torch.equal(decrypt_shard(str(tmp_path / "set"), KEY, 13), IMAGES[13])
    # The same encoding in one file (it fits under the default limit) holds the same bytes in the same order.
    single = encode(tmp_path / "one.shard", max_shard_size="2GB")
    assert os.path.isfile(tmp_path / "one.shard") and single.count == 45
    together = ConcatenatedShards.open([tmp_path / "set"])
    assert torch.equal(together.take(torch.arange(45)), open_shard(tmp_path / "one.shard")[:])
    with pytest.raises(ValueError, match="max_shard_size must hold at least one item"):
        encode(tmp_path / "tiny", max_shard_size="600B")


def test_an_interrupted_encoding_resumes_after_its_last_part_byte_for_byte(tmp_path):
    encode(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        encode(tmp_path / "resumed", Reader(IMAGES, fail_at=3 * PER_PART + 4))  # 3 parts done, the 4th half-way
    left = sorted(os.listdir(tmp_path / "resumed"))
    assert left == [INDEX_NAME, "part-00000.shard", "part-00001.shard", "part-00002.shard"]  # no temporary
    index = ShardSetIndex.read(str(tmp_path / "resumed"))
    assert not index.complete and [p.written for p in index.parts] == [True] * 3 + [False] * 5
    with pytest.raises(ShardError, match="unfinished shard set .3 of 8 parts"):
        open_shards([tmp_path / "resumed"])
    with pytest.raises(ShardError, match="unfinished"):
        decrypt_shard(str(tmp_path / "resumed"), KEY)
    reader = Reader(IMAGES)
    encode(tmp_path / "resumed", reader, sample_id_start=None)  # the same call; the folder's id start is reused
    # Read again: the missing parts' images, and every part's first and last image (the data check).
    assert reader.read_count == 45 - 3 * PER_PART + 2 * 8
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "straight")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        encode(tmp_path / "resumed")
    encode(tmp_path / "resumed", overwrite=True, sample_id_start=5)
    assert ShardSetIndex.read(str(tmp_path / "resumed")).metadata.encryption["sample_id_start"] == 5


@pytest.mark.parametrize("change, message", [
    (dict(key=Key.from_secret(b"another consortium")), "different key .fingerprint"),
    (dict(images=torch.flip(IMAGES, dims=[0])), r"different data \(items 0..5 differ\)"),
    (dict(sample_id_start=7), r"different sample-id range \(start 1000, not 7\)"),
    (dict(encryption=EncryptionSpec(cipher_dtype="float32")), "different encryption, geometry"),
    (dict(encryption=EncryptionSpec(per_sample=False)), "different encryption, sample-id range"),
    (dict(max_shard_size="6kB"), r"different max_shard_size \(4000 bytes, not 6000\)"),
    (dict(max_shard_size="1MB"), r"different max_shard_size \(4000 bytes, not 1000000\)"),  # would fit one file
    (dict(client="site-b"), "different client name"),
], ids=["key", "data", "sample-ids", "dtype", "per-sample", "size", "one-file", "client"])
def test_resuming_with_other_settings_is_refused_naming_what_differs(tmp_path, change, message):
    with pytest.raises(KeyboardInterrupt):
        encode(tmp_path / "set", Reader(IMAGES, fail_at=2 * PER_PART))
    before = folder_bytes(tmp_path / "set")
    change = dict(change)
    key, images = change.pop("key", KEY), change.pop("images", IMAGES)
    options = dict(dict(patch_size=4, batch_size=4, max_shard_size=PART, sample_id_start=1000), **change)
    with pytest.raises(ValueError, match=message) as error:
        encode_dataset(ImageSet(Reader(images)), key, str(tmp_path / "set"), **options)
    assert "run the same encoding again to finish it, or replace it (--force" in str(error.value)
    assert "\n" not in str(error.value) and folder_bytes(tmp_path / "set") == before


def test_the_server_reads_folders_and_parts_lazily_and_refuses_a_file_twice(tmp_path):
    encode(tmp_path / "a")
    encode(tmp_path / "b.shard", max_shard_size="2GB", client="b")
    data = ShardDataset.open([tmp_path / "a", tmp_path / "b.shard"])
    assert len(data) == 90 and data.sizes == [PER_PART] * 7 + [3, 45]
    single = open_shard(tmp_path / "b.shard")[:]
    picks = torch.tensor([89, 0, 44, 45, 13, 13, 50])
    expected = torch.cat([open_shard(tmp_path / "b.shard")[:]] * 2)[picks]  # a and b hold the same bytes
    assert torch.equal(data.take(picks), expected) and torch.equal(data.take(torch.arange(45, 90)), single)
    assert data.shard_of(44) == 7 and data.shard_of(45) == 8
    with pytest.raises(IndexError, match=r"\[0, 90\)"):
        data.take(torch.tensor([90]))
    values = data.take(torch.linspace(0, 89, 90).round().long().unique()).double()  # the whole set: its sample
    mean, std = data.input_stats()
    assert mean == pytest.approx(float(values.mean()), rel=1e-12, abs=1e-15)
    assert std == pytest.approx(float(values.std()), rel=1e-12)
    with pytest.raises(ShardError, match="given twice"):
        open_shards([tmp_path / "a", tmp_path / "a" / "part-00003.shard"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ShardError, match="not a shard set"):
        open_shards([tmp_path / "plain"])
    shutil.copy(tmp_path / "a" / "part-00001.shard", tmp_path / "a" / "part-00002.shard")  # a valid shard, misplaced
    with pytest.raises(ShardError, match="part-00002.shard is missing or is not the part"):
        open_shards([tmp_path / "a"])


def test_cli_encodes_a_folder_and_pretrain_takes_it(tmp_path, capsys):
    KEY.save(tmp_path / "k.key")
    common = ["encode", "--key", str(tmp_path / "k.key"), "--data", "synthetic:40", "--image-size", "16",
              "--patch-size", "4", "--sample-id-start", "0", "--max-shard-size", "5kB"]
    assert main(common + ["--out", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert "-> " + str(tmp_path / "site") in out and "5 shards of at most 5kB" in out and "client 'site'" in out
    assert main(common + ["--out", str(tmp_path / "site")]) == 2
    assert "exists; refusing to replace it (--force" in capsys.readouterr().err
    assert main(common[:-1] + ["lots", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("msd-fast encode: error: --max-shard-size must be a size such as 2GB")
    run = tmp_path / "run"
    assert main(["pretrain", str(tmp_path / "site"), "--out", str(run), "--epochs", "1", "--batch-size", "16",
                 "--depth", "1", "--embed-dim", "24", "--num-heads", "2", "--out-dim", "32", "--head-hidden-dim",
                 "32", "--head-bottleneck-dim", "16", "--local-views", "2", "--no-progress"]) == 0
    assert os.path.exists(run / "checkpoint.pt")
    parts = [part.count for part in ShardSetIndex.read(str(tmp_path / "site")).parts]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["data_sizes"] == parts and sum(parts) == 40


def _parts(folder):
    return [n for n in os.listdir(folder) if n.startswith("part-")] if os.path.isdir(folder) else []


def test_sigterm_mid_encoding_keeps_complete_parts_and_the_same_command_finishes_them(tmp_path):
    KEY.save(tmp_path / "k.key")
    command = [sys.executable, "-m", "msd_fast.cli", "encode", "--key", str(tmp_path / "k.key"), "--data",
               "synthetic:800", "--image-size", "16", "--patch-size", "4", "--sample-id-start", "3",
               "--max-shard-size", "5kB", "--batch-size", "4", "--client", "site-a"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen(command + ["--out", str(tmp_path / "cut")], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while len(_parts(tmp_path / "cut")) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "msd-fast encode: terminated"
    index = ShardSetIndex.read(str(tmp_path / "cut"))
    assert not index.complete, "the encoding finished before it could be interrupted"
    written = sum(part.written for part in index.parts)
    listed = [p.file for p in index.parts[:written]]
    # Parts recorded in the index exist; at most the next one may be complete on disk but not yet recorded (the
    # signal came between its rename and the index update): the resumed run writes it again.
    assert written >= 2 and set(listed) <= set(_parts(tmp_path / "cut")) <= set(listed + [index.parts[written].file])
    assert not [n for n in os.listdir(tmp_path / "cut") if n.startswith(".msd_fast-")]
    resumed = subprocess.run(command + ["--out", str(tmp_path / "cut")], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(command + ["--out", str(tmp_path / "whole")], capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr
    assert folder_bytes(tmp_path / "cut") == folder_bytes(tmp_path / "whole")


def test_overwrite_turns_a_folder_into_a_file_and_back(tmp_path):
    out = tmp_path / "x"
    encode(out)
    encode(out, max_shard_size="2GB", overwrite=True)  # fits now: one file where the folder was
    assert out.is_file() and torch.equal(decrypt_shard(str(out), KEY), IMAGES)
    encode(out, overwrite=True)
    assert out.is_dir() and len(open_shard_set(out)) == 8 and torch.equal(decrypt_shard(str(out), KEY), IMAGES)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):  # a folder holding anything else is never deleted
        encode(out, max_shard_size="2GB", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and len(open_shard_set(out)) == 8


def test_a_shard_reads_any_rows_in_order_with_repeats_and_closes(tmp_path):
    encode(tmp_path / "one.shard", max_shard_size="2GB")
    shard = open_shard(tmp_path / "one.shard")
    every = shard[:]
    rows = [44, 3, 3, 4, 5, 0, 44]
    assert torch.equal(shard[rows], every[rows]) and torch.equal(shard[7], every[7])
    assert torch.equal(shard[40:2:-3], every.flip(0)[4:43:3]) and shard[5:5].shape == (0, *every.shape[1:])
    shard.close()
    with pytest.raises(ValueError, match="closed"):
        shard[0]
